"""Constants shared with the released Cambrian / LLaVA code."""

IMAGE_TOKEN_INDEX = -200  # `<image>` in a prompt becomes this id, then the image tokens
IGNORE_INDEX = -100       # label value that the loss skips
DEFAULT_IMAGE_TOKEN = "<image>"
