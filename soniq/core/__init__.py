"""The sans-IO core of Soniq.

Everything here is pure: given inputs, it returns SQL with its parameters, a new job
state, or a validation error. Nothing here opens a socket, sleeps or reads the clock;
callers pass a clock in. Drivers (``soniq.drivers``) execute what the core builds.
"""
