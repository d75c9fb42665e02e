import pytest

from zmserve.protocol import endpoint_host_port, normalize_address


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [("127.0.0.1:5500", "tcp://127.0.0.1:5500"), ("localhost:5500", "tcp://localhost:5500"),
     ("tcp://127.0.0.1:5500", "tcp://127.0.0.1:5500"), ("ipc:///tmp/x", "ipc:///tmp/x")],
)
def test_address_forms(address: str, endpoint: str) -> None:
    assert normalize_address(address) == endpoint


def test_host_port_split() -> None:
    assert endpoint_host_port("tcp://10.0.0.2:6200") == ("10.0.0.2", 6200)
    with pytest.raises(ValueError):
        endpoint_host_port("nohost")
