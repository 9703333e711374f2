"""A record's text, its length in tokens, and how it is sent."""
