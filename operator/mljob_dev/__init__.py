"""Development tools: the local stack, the demo, fault injection. Not in the wheel or the image."""
