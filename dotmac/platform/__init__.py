"""DotMac Platform Services: the seed's import paths over the sidecar's building blocks."""
