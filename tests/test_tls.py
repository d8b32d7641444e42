"""What a SuperLink's certificate is valid for, and the compose file for SuperNodes that join a
SuperLink on another machine (the real thing: tests/test_netns.py)."""

import ipaddress

import pytest
import yaml
from cryptography import x509

from launch.compose import compose_yaml
from launch.tls import certificate_hosts, make_tls


def test_certificate_hosts_add_the_given_ones_once_and_never_a_wildcard():
    assert certificate_hosts() == ("127.0.0.1", "localhost", "superlink")
    assert certificate_hosts("0.0.0.0", "10.0.0.5", "node.example.org", "10.0.0.5", "") == (
        "127.0.0.1", "localhost", "superlink", "10.0.0.5", "node.example.org")
    with pytest.raises(ValueError, match="is not a host name"):
        certificate_hosts("evil host/../x")
    for bad in ("bücher.example", "host:9090", "-dash.example"):  # not ASCII; a port; a label's edge
        with pytest.raises(ValueError, match="is not a host name"):
            certificate_hosts(bad)
    assert certificate_hosts("::1")[-1] == "::1"  # an IPv6 address is one


def test_the_certificate_names_exactly_those_hosts(tmp_path):
    tls = make_tls(tmp_path, certificate_hosts("10.0.0.5", "link.example.org"))
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.0.0.5")}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "link.example.org"}


def test_compose_for_supernodes_joining_a_superlink_elsewhere():
    services = yaml.safe_load(compose_yaml(2, "1.42.0", superlink="192.0.2.10:9090", first=3, partitions=5))["services"]
    assert "superlink" not in services and "serverapp" not in services
    nodes = sorted(name for name in services if name.startswith("supernode-"))
    assert nodes == ["supernode-3", "supernode-4"]
    for i in (3, 4):
        command = services[f"supernode-{i}"]["command"]
        assert command[command.index("--superlink") + 1] == "192.0.2.10:9090"
        assert command[command.index("--node-config") + 1] == f"partition-id={i} num-partitions=5"
        assert command[command.index("--auth-supernode-private-key") + 1] == f"/certs/node{i}"
        assert "depends_on" not in services[f"supernode-{i}"]


def test_compose_and_deploy_refuse_what_cannot_work(flain_cli, tmp_path):
    out = str(tmp_path / "dc.yml")
    cases = [(("compose", "--nodes", "2", "--first-partition", "1", "--out", out), "does not fit --num-partitions 2"),
             (("compose", "--superlink", "no-port", "--out", out), "is not HOST:PORT"),
             (("compose", "--nodes", "2", "--num-partitions", "4", "--out", out), "they need --superlink"),
             (("compose", "--superlink", "h.example:9090", "--certs", str(tmp_path / "c"), "--out", out),
              "does not trust"),
             (("compose", "--superlink", "h.example:9090", "--san", "h.example", "--out", out), "takes none"),
             (("compose", "--san", "h.example", "--out", out), "it needs --certs DIR"),
             (("deploy", "--san", "10.0.0.5", "--dry-run"), "it needs --tls"),
             (("deploy", "--superlink-host", "0.0.0.0", "--dry-run"), "it needs --tls"),
             (("run", "--resume", str(tmp_path / "nowhere")), "is not a flain run directory")]
    for args, message in cases:
        proc = flain_cli(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_compose_takes_a_bracketed_ipv6_superlink(flain_cli, tmp_path):
    out = tmp_path / "dc.yml"
    proc = flain_cli("compose", "--nodes", "2", "--superlink", "[2001:db8::5]:9090", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    command = yaml.safe_load(out.read_text())["services"]["supernode-0"]["command"]
    assert command[command.index("--superlink") + 1] == "[2001:db8::5]:9090"
