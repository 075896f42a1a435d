"""A DHCP interface whose port is taken (dnsmasq already there) is said in the heartbeat as `failed: cannot
listen on 0.0.0.0:67 on lo: address in use (another DHCP server running?)` while DHCP retries it, and is
cleared once the port is free. Run in a network namespace of its own (unshare -n): nothing on the host's
interfaces is bound or answered."""

import shutil
import subprocess
import textwrap

from support import PYTHON, ROOT

SCENARIO = textwrap.dedent('''
    import asyncio, socket, subprocess, sys, tempfile, time
    from pathlib import Path
    from services.dhcp.service import DhcpService
    from shared.config.loader import config_from_dict
    from shared.managed import ManagedRuntime

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # another DHCP server, no SO_REUSEADDR
    squatter.bind(("0.0.0.0", 67))
    config = {"dhcp": {"interfaces": [{"name": "lo"}], "lease_file": "leases.sqlite",
                       "scopes": [{"name": "r", "subnet": "127.0.0.0/8", "ranges": [{"start": "127.0.0.10", "end": "127.0.0.20"}]}]}}
    state = Path(tempfile.mkdtemp())
    runtime = ManagedRuntime(DhcpService, 0, state)
    runtime.ctx._emitter = lambda t, f: None

    def failed_within(seconds, want):
        deadline = time.monotonic() + seconds
        while True:
            got = runtime._beat_info()["failed"]
            if want(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    async def main():
        runtime.loop = asyncio.get_running_loop()
        assert await runtime.apply(1, config_from_dict(config).model_dump(mode="json"))
        got = await asyncio.to_thread(failed_within, 10, lambda f: f is not None)
        print("FAILED", got, flush=True)
        squatter.close()
        got = await asyncio.to_thread(failed_within, 10, lambda f: f is None)
        print("CLEARED", got, flush=True)
        await runtime.service.stop()

    asyncio.run(main())
''')


def test_a_refused_dhcp_socket_rides_in_the_heartbeat_until_it_opens():
    assert shutil.which("unshare"), "unshare (util-linux) is missing"
    out = subprocess.run(["unshare", "--net", PYTHON, "-c", SCENARIO], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("FAILED {'revision': 1, 'reason': 'cannot listen on 0.0.0.0:67 on lo: address in use "
                        "(another DHCP server running?)'}"), out.stdout + out.stderr
    assert lines[1] == "CLEARED None", out.stdout + out.stderr
