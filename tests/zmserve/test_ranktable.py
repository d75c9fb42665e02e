from __future__ import annotations

import copy

import pytest

from zmserve.ranktable import RankTable, RankTableError

TABLE = {
    "version": "1.0", "server_count": "2",
    "server_list": [
        {"server_id": "10.0.0.1", "device": [{"device_id": "0", "device_ip": "1.1.1.1", "rank_id": "0"},
                                             {"device_id": "1", "device_ip": "1.1.1.2", "rank_id": "1"}],
         "host_nic_ip": "reserve"},
        {"server_id": "10.0.0.2", "device": [{"device_id": "0", "device_ip": "1.1.1.3", "rank_id": "2"},
                                             {"device_id": "1", "device_ip": "1.1.1.4", "rank_id": "3"}],
         "host_nic_ip": "reserve"},
    ],
    "status": "completed",
}


def test_valid_table_maps_ranks_to_servers() -> None:
    table = RankTable.parse(TABLE, 4)
    assert table.ranks_of_server("10.0.0.2") == [2, 3]
    assert RankTable.parse(table.to_document(), 4).entries == table.entries


def mutated(change) -> dict:
    document = copy.deepcopy(TABLE)
    change(document)
    return document


@pytest.mark.parametrize(
    ("document", "rank_size", "fragment"),
    [
        (TABLE, 8, "rank_size is 8"),
        (mutated(lambda d: d["server_list"][1]["device"][0].update(rank_id="1")), 4, "rank 1 appears twice"),
        (mutated(lambda d: d["server_list"][1]["device"][1].update(rank_id="7")), 4, "ranks [3] are missing"),
        (mutated(lambda d: d.update(server_count="3")), 4, "server_count is 3"),
        (mutated(lambda d: d.update(status="initializing")), 4, "status"),
        ({"nothing": 1}, 4, "server_list"),
    ],
)
def test_bad_tables_are_rejected_naming_the_problem(document: dict, rank_size: int, fragment: str) -> None:
    with pytest.raises(RankTableError) as caught:
        RankTable.parse(document, rank_size, "t.json")
    assert fragment in str(caught.value)
