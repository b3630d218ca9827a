"""The bottom layer: what every floor of patchscope needs, one copy each.

Device and precision choice, crash-safe writes that honour the umask, the user-error types,
the run-folder rule and the label convention. It imports nothing else of patchscope, so
`forensics` and `generators` can both build on it without importing each other.
"""
