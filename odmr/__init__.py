"""odmrd: an On-Demand Mail Relay (RFC 2645) provider and customer."""

__version__ = "0.1.0"
