"""In-process stand-ins for the parts of a Flower Grid a test drives (node ids, and
optionally answers); every other Grid method refuses."""

from collections.abc import Iterable

from flwr.serverapp import Grid


class LocalGrid(Grid):
    """`nodes` connected node ids (1..nodes); `send_and_receive` is the subclass's job."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.nodes + 1))

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *a, **k):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError
