"""The bottom layer: settings, the event contract and the sample type every layer shares.

Nothing here imports another driftrec package.
"""
