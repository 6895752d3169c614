"""Storage: every Redis key layout, Lua script and snapshot format, in one layer.

Above ``contract`` and ``models``; below ``streams`` (transport) and ``serving`` (HTTP), which
both read and write Redis only through this package.
"""
