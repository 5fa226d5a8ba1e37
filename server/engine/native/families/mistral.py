"""Mistral: Llama's layout; ``sliding_window`` applies unless ``use_sliding_window`` is false
(the runner then caps a sequence at the window, within which attention is full)."""

import functools

from server.engine.native.config import NativeConfig
from server.engine.native.families import ModelFamily, register

register(ModelFamily("mistral", functools.partial(NativeConfig.from_dict, sliding_window_by_default=True)))
