"""Soft prompts: the template that places virtual tokens in the input, and the modules that learn them."""

from softtool.prompts.template import Segment, Template, virtual_token_id

__all__ = ["Segment", "Template", "virtual_token_id"]
