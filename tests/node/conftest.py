"""The node's tests (`make test-node`, as root): a stack of their own with a node (containerd, a
kubelet, a controller manager, a scheduler), and the image built from the Dockerfile and loaded
into the node's containerd. Every module here is marked `node`, which `make test` leaves out.

The `stack` fixture is this folder's own: the top-level one would take the stack `make test`
started, which has no node.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mljob_dev.devstack import image
from mljob_dev.devstack import stack as devstack
from support.stack import StackEnv


@pytest.fixture(scope="session")
def node_stack() -> Iterator[devstack.Stack]:
    running = devstack.up(node=True)
    try:
        yield running
    finally:
        devstack.down(running.directory)


@pytest.fixture(scope="session")
def stack(node_stack: devstack.Stack) -> StackEnv:
    return StackEnv.of(node_stack.env)


@pytest.fixture(scope="session")
def built_image(node_stack: devstack.Stack) -> str:
    """The Dockerfile as it is, built by buildah on the debootstrap base, loaded into containerd."""
    image.build()
    image.load(node_stack.directory)
    return image.IMAGE
