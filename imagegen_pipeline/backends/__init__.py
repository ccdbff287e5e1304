"""Image backends: one module (or package) per backend behind ``base.ImageBackend``.

Each declares everything about itself in one ``SPEC`` (see ``model_spec.py``); ``registry.py``
lists them. ``diffusers_text_to_image`` is what the local diffusers backends share.
"""
