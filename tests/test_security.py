"""CURVE security: `slipstream keys` makes the certificates; a broker with CURVE on answers only a
peer holding an authorized client key and the server's public key (others get no reply at all);
and the config refuses a non-loopback queue.host without keys unless queue.insecure = true."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import zmq
import zmq.auth

from pipeline.config import load_config
from pipeline.configbase import ConfigError
from schemas.codec import decode, encode
from schemas.messages import Ack, Hello, Welcome
from tests.helpers import broker_config, env, process, slipstream, wait_json
from tests.test_schemas import make_group


def _dealer(endpoint: str, client: tuple[bytes, bytes] | None, server_public: bytes | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client is not None:
        sock.curve_publickey, sock.curve_secretkey = client
        sock.curve_serverkey = server_public
    sock.connect(endpoint)
    return sock


def _ask(sock: zmq.Socket, msg, timeout_s: float):
    sock.send_multipart(encode(msg))
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return decode(sock.recv_multipart())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    r = subprocess.run(slipstream("keys", str(out)), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized_clients/client.key"):
        assert (out / name).exists(), name
    assert (out / "server.key_secret").stat().st_mode & 0o077 == 0, "secret keys must not be world-readable"
    return out


def test_config_refuses_non_loopback_without_keys(keys: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.path='m'", "queue.host='0.0.0.0'"])
    assert e.value.key == "queue.host" and "slipstream keys" in str(e.value)
    assert load_config(None, ["model.path='m'", "queue.host='0.0.0.0'", "queue.insecure=true"]).queue.insecure
    cfg = load_config(None, ["model.path='m'", "queue.host='0.0.0.0'", f"queue.curve_server_key='{keys / 'server.key_secret'}'",
                             f"queue.curve_client_key='{keys / 'client.key_secret'}'"])
    assert cfg.queue.curve_server_key
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.path='m'", f"queue.curve_server_key='{keys / 'server.key_secret'}'"])
    assert e.value.key == "queue.curve_client_key"
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert load_config(None, ["model.path='m'", f"queue.host='{host}'"]).queue.host == host


def test_only_peers_with_the_keys_get_answers(tmp_path: Path, keys: Path) -> None:
    cfg = broker_config(tmp_path, f"""
curve_server_key = "{keys / 'server.key_secret'}"
curve_client_key = "{keys / 'client.key_secret'}"
""")
    run_dir = tmp_path / "run"
    with process(slipstream("broker", "--config", str(cfg), "--run-dir", str(run_dir)), tmp_path / "broker.log") as proc:
        ports = wait_json(run_dir / "ports" / "broker.json", proc=proc)
        endpoint = f"tcp://127.0.0.1:{ports['producer_port']}"
        server_public, _ = zmq.auth.load_certificate(keys / "server.key")
        client = zmq.auth.load_certificate(keys / "client.key_secret")
        stranger_public, stranger_secret = zmq.curve_keypair()
        hello = Hello(role="producer", peer_id="producer-0", epoch=1)

        plain = _dealer(endpoint, None, None)  # no CURVE at all
        assert _ask(plain, hello, 2.0) is None
        unauthorized = _dealer(endpoint, (stranger_public, stranger_secret), server_public)  # right server, unknown client
        assert _ask(unauthorized, hello, 2.0) is None
        wrong_server = _dealer(endpoint, client, zmq.curve_keypair()[0])  # authorized client, wrong server key
        assert _ask(wrong_server, hello, 2.0) is None

        good = _dealer(endpoint, client, server_public)
        assert isinstance(_ask(good, hello, 10.0), Welcome)
        good.send_multipart(encode(make_group(seq=0)))
        deadline_msgs = [decode(good.recv_multipart()) for _ in range(3) if good.poll(5000)]
        assert any(isinstance(m, Ack) and m.seq == 0 for m in deadline_msgs), deadline_msgs
        assert proc.poll() is None
