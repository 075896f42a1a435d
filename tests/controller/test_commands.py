"""Command handlers through the controller's facade, without a running loop; one validation per candidate."""

import pytest

from services.controller import config_store
from services.controller.commands import COMMANDS, EMPTY, SUCCESS, UNSUPPORTED, dispatch
from services.controller.io_loop import Controller
from services.controller.waiters import CommandKeys, Waiter, Waiters


@pytest.fixture
def controller(tmp_path):
    c = Controller(tmp_path / "state", None)
    yield c
    c.close()


def test_a_candidate_is_validated_once(controller, monkeypatch):
    calls = []
    real = config_store.config_from_dict
    monkeypatch.setattr(config_store, "config_from_dict", lambda data: calls.append(1) or real(data))
    answer = dispatch(controller.facade, [], "config-set", {"path": "boot.default_lun", "value": 4})
    assert answer["result"] == SUCCESS and answer["arguments"]["revision"] == 2
    assert len(calls) == 1
    assert controller.clone.get("config") == {"revision": 2, "config": controller.store.data}


def test_list_commands_is_the_table_the_cli_renders(controller):
    answer = dispatch(controller.facade, [], "list-commands", {})
    assert answer["arguments"]["commands"] == {n: c.help for n, c in COMMANDS.items()}
    assert all(c.summary and "\n" not in c.summary for c in COMMANDS.values())
    assert dispatch(controller.facade, [], "nope", {})["result"] == UNSUPPORTED


def test_lease_list_without_a_store_answers_from_lease_events(controller):
    assert dispatch(controller.facade, [], "lease-list", {})["result"] == EMPTY
    controller.leases.observe("dhcp.lease.granted", {"mac": "52:54:00:00:00:01", "ip": "10.0.0.5", "expires": 2e9})
    answer = dispatch(controller.facade, [], "lease-list", {})
    assert answer["arguments"] == {
        "leases": [{"ip": "10.0.0.5", "mac": "52:54:00:00:00:01", "state": "bound", "expires": 2e9}],
        "source": "events",
    }
    controller.leases.observe("dhcp.lease.released", {"mac": "52:54:00:00:00:01", "ip": "10.0.0.5"})
    assert controller.clone.get("lease/10.0.0.5") is None


def test_lease_release_puts_a_command_key_and_waits_for_the_event(controller):
    assert dispatch(controller.facade, [b"cli"], "lease-release", {"mac": "52:54:00:00:00:01"}) is None
    keys = [k for k in controller.clone.store if k.startswith("command/dhcp/")]
    assert len(keys) == 1 and controller.clone.get(keys[0])["name"] == "lease-release"
    assert controller.waiters.matched({"type": "dhcp.lease.released", "fields": {"mac": "52:54:00:00:00:02"}}) == []
    [(envelope, answer)] = controller.waiters.matched(
        {"type": "dhcp.lease.released", "fields": {"mac": "52:54:00:00:00:01", "ip": "10.0.0.5"}}
    )
    assert envelope == [b"cli"] and answer["result"] == SUCCESS and "10.0.0.5" in answer["text"]


class FakeStore:
    def __init__(self):
        self.keys = {}

    def set(self, key, val):
        if val is None:
            self.keys.pop(key, None)
        else:
            self.keys[key] = val
        return 0


def test_command_keys_expire_and_waiters_time_out():
    store = FakeStore()
    keys = CommandKeys(store)
    key = keys.send("dhcp", "lease-release", {"mac": "m"}, now=100.0)
    assert key.startswith("command/dhcp/") and store.keys[key]["ts"] == 100.0
    keys.expire(159.0)
    assert key in store.keys
    keys.expire(160.0)
    assert key not in store.keys
    waiters = Waiters()
    waiters.add(Waiter([b"a"], lambda msg: False, 5.0, lambda msg: {}, lambda: {"result": 1}))
    assert waiters.expired(4.9) == [] and len(waiters) == 1
    assert waiters.expired(5.0) == [([b"a"], {"result": 1})] and len(waiters) == 0
