"""tcp-intercept: a transparent TCP proxy for Linux routers (TPROXY)."""

__version__ = "2.0.0"
NAME = "tcp-intercept"
