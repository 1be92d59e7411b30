"""tcp-intercept: a transparent TCP proxy for Linux routers (TPROXY)."""

__version__ = "2.1.0"
NAME = "tcp-intercept"
