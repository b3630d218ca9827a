"""The patch classifier core: models, receptive fields, data, training and scoring.

Everything else in patchscope (generators aside) builds on these modules.
"""
