"""The trainable parts beside the frozen backbone: the side network, its memory attention,
the token-cache reader, and the training-free backbone memory."""
