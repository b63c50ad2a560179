"""Choices of the Hugging Face policy that the command line shows, in a module free of torch
(re-exported by :mod:`.hf`, where they are used)."""

#: The forms of ``--trainable`` / ``HFRestrictedPolicy(trainable=...)``.
TRAINABLE_HELP = ("all | last:N (the last N blocks) | head (the LM head) | lora:R (LoRA adapters of rank R on "
                  "every linear layer of the blocks, B = 0 at start; needs peft)")
#: Prefix sharing of the exact forward pass: tree attention in one call, or a key/value cache per level.
TREE_MODES = ("auto", "packed", "levels")

__all__ = ["TRAINABLE_HELP", "TREE_MODES"]
