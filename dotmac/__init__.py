"""The DotMac namespace: `dotmac.platform` keeps the seed's import paths working."""
