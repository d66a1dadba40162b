"""The request path: canonical path, rule, authentication, headers, streaming forward."""
