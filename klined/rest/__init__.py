"""The exchanges' REST APIs at runtime: an HTTP client with retries, and shared rate limits.

The request and response formats are the adapters' (:mod:`klined.exchanges`); this package does
the I/O: one :class:`~klined.rest.client.RestClient` per exchange, every request waiting for
that exchange's :class:`~klined.rest.ratelimit.RateLimiter`.
"""
