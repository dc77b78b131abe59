"""The fault catalogue, the table under "The catalogue" in `docs/reliability.md` (rows R1-R23,
B1-B19, U1-U12; it began as §4 of the developers' guide's RELIABILITY.md and is the project's
own now): every row maps to the tests that drive its fault against the real thing and assert
its outcome, or to a one-line reason it does not apply. `PROVEN` is the machine-readable
version; each row of the page names the same tests.

Also here: the dependency floors (aiohttp >= 3.14.3, redis >= 8.1.0), checked against the
installed distributions and against what `pyproject.toml` declares.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
CATALOGUE = REPO / "docs" / "reliability.md"

ROW_IDS = (
    [f"R{i}" for i in range(1, 24)]
    + [f"B{i}" for i in range(1, 20)]
    + [f"U{i}" for i in range(1, 13)]
)
# Issue 7: these rows may not be skipped (nor declared not applicable).
MANDATORY = frozenset(
    (
        "R1",
        "R2",
        "R3",
        "R4",
        "R5",
        "R6",
        "R8",
        "R10",
        "R11",
        "R12",
        "R13",
        "R14",
        "R15",
        "R16",
        "R17",
        "R19",
        "R20",
        "R21",
        "R23",
        "B2",
        "B3",
        "B6",
        "B7",
        "B8",
        "B9",
        "B10",
        "B12",
        "B14",
        "B15",
        "B16",
        "B17",
        "U1",
        "U2",
        "U3",
        "U4",
        "U5",
        "U6",
        "U9",
        "U11",
    )
)

FR = "tests/test_redis_failures.py::"
FB = "tests/test_hostile_requests.py::"
FP = "tests/test_http_parsers.py::"
FU = "tests/test_upstream_failures.py::"
SH = "tests/test_sessions_http.py::"
PF = "tests/test_proxy_failures.py::"
PR = "tests/test_proxy_routing.py::"
PH = "tests/test_proxy_headers.py::"

# Row -> the tests that prove its outcome (existing tests are referenced, not duplicated).
PROVEN: dict[str, tuple[str, ...]] = {
    # 4.1 Session store (Redis) faults
    "R1": (
        "tests/test_processes.py::test_redis_down_at_start_exits_1_within_10s",
        "tests/test_processes.py::test_a_frozen_redis_at_start_exits_1_without_ever_listening",
        "tests/test_redis_outage.py::test_store_down_at_start_fails_fast_with_a_redacted_message",
        "tests/test_store_hints.py::test_a_wrong_password",
        "tests/test_store_hints.py::test_a_sentinel_url_aimed_at_a_plain_redis",
        "tests/test_store_hints.py::test_nothing_listening",
    ),
    "R2": (
        "tests/test_redis_outage.py::test_redis_killed_then_restarted",
        "tests/test_proxy_session.py::test_session_store_down_means_503_before_the_upstream_is_called",
    ),
    "R3": (
        FR + "test_R03_a_short_restart_with_aof_is_invisible_and_loses_nothing",
        FR + "test_R03_without_aof_a_restart_loses_sessions_which_read_as_none_not_errors",
    ),
    "R4": ("tests/test_redis_outage.py::test_redis_killed_then_restarted",),
    "R5": (
        FR + "test_R05_a_pool_full_of_stale_connections_after_a_restart_gives_no_5xx",
        FR + "test_R05_client_kill_of_every_gateway_connection_is_invisible",
    ),
    "R6": (
        "tests/test_redis_outage.py::test_frozen_redis_answers_503_not_a_hang",
        FR + "test_R06_client_pause_all_is_a_503_within_the_deadline_and_nothing_leaks",
    ),
    "R7": (FR + "test_R07_loading_is_retried_within_the_budget_then_503_and_recovers",),
    "R8": (FR + "test_R08_a_full_redis_refuses_writes_with_503_and_keeps_serving_reads",),
    "R9": (
        "tests/test_redis_sentinel.py::"
        "test_readonly_from_a_demoted_plain_redis_is_a_fast_503_and_reconnects",
        "tests/test_redis_sentinel.py::"
        "test_coordinated_failover_demotes_a_live_primary_and_the_gateway_follows",
    ),
    "R10": (FR + "test_R10_an_exhausted_pool_answers_503_fast_without_a_deadlock",),
    "R11": (
        FR + "test_R11_cancelled_commands_never_mix_replies_and_return_their_connections",
        FR + "test_R11_browsers_hanging_up_mid_command_leave_nothing_behind",
    ),
    "R12": (
        SH + "test_a_corrupt_value_is_no_session_and_removed",
        "tests/test_store_contract.py::test_a_key_of_another_type_is_no_session_and_removed",
    ),
    "R13": (
        SH + "test_size_limit_413_keeps_the_old_value",
        SH + "test_a_new_session_over_the_limit_is_not_created",
    ),
    "R14": (
        "tests/test_session_concurrent_writes.py::test_concurrent_patches_on_two_replicas_all_survive",
        "tests/test_session_concurrent_writes.py::test_concurrent_patches_of_different_keys_both_survive",
        "tests/test_session_storage_api.py::test_a_lost_race_is_a_409_json_answer_never_a_500",
    ),
    "R15": (
        SH + "test_a_write_racing_a_logout_does_not_resurrect",
        FR + "test_R15_logout_on_one_replica_while_another_saves_later_is_not_undone",
        "tests/test_session_storage_api.py::"
        "test_a_session_deleted_meanwhile_is_409_session_ended_not_resurrected",
    ),
    "R16": (FR + "test_R16_a_session_that_expires_between_load_and_save_is_not_recreated",),
    "R17": (
        SH + "test_key_format_and_ttl",
        SH + "test_a_read_slides_the_ttl",
        SH + "test_an_expired_session_is_gone",
    ),
    "R18": (
        "tests/test_session_lifetime.py::test_an_active_session_ends_at_its_absolute_deadline",
    ),
    "R19": (
        "tests/test_session_rotation.py::test_rotate_moves_the_data_to_a_new_id_and_kills_the_old",
        "tests/test_session_rotation.py::test_a_write_with_the_old_id_does_not_come_back",
    ),
    "R20": (
        SH + "test_delete_removes_the_key_and_expires_the_cookie",
        FR + "test_R20_a_replayed_cookie_after_logout_is_no_session_and_never_revived",
    ),
    "R21": (
        "tests/test_processes.py::test_sigterm_finishes_in_flight_requests_then_exits_0",
        PF + "test_sigterm_ends_a_demo_stream_with_shutting_down_and_exits_0",
        FR + "test_R21_sigterm_with_streams_and_sessions_in_flight_leaves_nothing_unclosed",
        "tests/test_e2e_replicas.py::"
        "test_rolling_restart_under_load_fails_nothing_and_loses_no_session",
    ),
    "R22": (
        SH + "test_memory_store_warns_that_it_is_per_process",
        FR + "test_R22_the_local_cluster_refuses_several_replicas_on_the_memory_store",
    ),
    "R23": (
        SH + "test_get_without_a_session_creates_nothing",
        SH + "test_memory_store_stays_bounded_under_a_flood",
        "tests/test_store_contract.py::test_memory_flood_stays_bounded",
    ),
    # 4.2 Bad input from browsers
    "B1": (SH + "test_get_without_a_session_creates_nothing",),
    "B2": (
        FB + "test_B02_B05_malformed_cookies_are_no_session_and_never_reach_the_store",
        SH + "test_junk_cookies_mean_no_session",
        SH + "test_malformed_cookies_never_reach_the_store",
    ),
    "B3": (FB + "test_B03_B04_colons_and_glob_characters_never_build_a_key",),
    "B4": (FB + "test_B03_B04_colons_and_glob_characters_never_build_a_key",),
    "B5": (FB + "test_B02_B05_malformed_cookies_are_no_session_and_never_reach_the_store",),
    "B6": (FB + "test_B06_duplicate_cookies_resolve_to_exactly_one_session_never_a_mix",),
    "B7": (SH + "test_junk_cookies_mean_no_session",),
    "B8": (
        FB + "test_B08_traversal_and_unknown_application_ids_are_refused_before_anything",
        SH + "test_a_malformed_application_id_is_400",
        SH + "test_an_unknown_application_is_404",
        SH + "test_bad_application_ids_never_reach_the_store",
        PR + "test_base_path_escapes_are_refused",
    ),
    "B9": (FP + "test_B09_huge_heads_are_400_and_reach_no_handler",),
    "B10": (
        FB + "test_B10_a_huge_body_is_413_and_changes_nothing",
        SH + "test_a_chunked_body_over_the_cap_is_413",
        PR + "test_a_declared_body_over_the_cap_is_refused_before_the_upstream",
        PR + "test_a_chunked_body_is_cut_off_at_the_cap",
    ),
    "B11": (
        FB + "test_B11_compressed_session_bodies_are_not_decompressed",
        FB + "test_B11_compressed_agent_bodies_reach_the_upstream_byte_for_byte",
    ),
    "B12": (
        FP + "test_B12_slowloris_connections_are_closed_within_the_header_timeout",
        FP + "test_B12_a_slow_but_complete_head_within_the_timeout_is_served",
    ),
    "B13": (
        "tests/test_proxy_streaming.py::test_a_slow_browser_slows_the_upstream_read",
        "tests/test_proxy_streaming.py::test_no_keepalive_while_the_browser_is_not_reading",
    ),
    "B14": (
        FP + "test_B14_smuggling_corpus_is_refused_and_never_two_requests",
        FP + "test_B14_a_pipelining_flood_is_answered_in_order_and_bounded",
        FP + "test_B14_a_well_formed_pipelined_pair_is_two_requests",
    ),
    "B15": (PH + "test_request_header_hygiene_for_an_untrusted_peer",),
    "B16": (
        PH + "test_request_header_hygiene_for_an_untrusted_peer",
        PH + "test_a_trusted_proxy_is_believed_and_its_other_headers_dropped",
        SH + "test_secure_auto_ignores_an_untrusted_peer",
    ),
    "B17": (
        FB + "test_B17_a_stored_value_with_crlf_never_becomes_an_upstream_header",
        FB + "test_B17_crlf_and_controls_in_requests_never_reach_upstream_headers",
        FB + "test_B17_configured_headers_with_crlf_are_a_configuration_error",
    ),
    "B18": (
        "tests/test_middlewares.py::test_an_insane_request_id_is_replaced",
        FB + "test_B02_B05_malformed_cookies_are_no_session_and_never_reach_the_store",
    ),
    "B19": (FB + "test_B19_unknown_and_lower_case_methods_on_session_routes_touch_nothing",),
    # 4.3 Upstream (agent service) faults
    "U1": (
        FU + "test_U01_a_connection_reset_at_once_is_a_fast_502_never_retried",
        PF + "test_upstream_refusing_connections_is_a_fast_502",
        PF + "test_upstream_hanging_up_without_an_answer_is_a_502",
    ),
    "U2": (
        FU + "test_U02_a_black_holed_upstream_is_a_504_after_the_connect_timeout",
        PF + "test_no_response_headers_in_time_is_a_504_and_the_upstream_is_cancelled",
    ),
    "U3": (
        FU + "test_U03_an_upstream_gone_silent_mid_stream_ends_with_an_idle_timeout_event",
        PF + "test_idle_upstream_stream_ends_with_an_idle_timeout_error_event",
        PF + "test_idle_non_sse_stream_aborts_the_browser_connection",
    ),
    "U4": (
        FU + "test_U04_an_upstream_cut_between_events_ends_with_an_error_event",
        FU + "test_U04_an_upstream_cut_inside_an_event_aborts_the_browser_connection",
        PF + "test_truncated_non_sse_bodies_abort_the_browser_connection",
    ),
    "U5": (FU + "test_U05_garbage_sse_passes_through_byte_for_byte",),
    "U6": (FU + "test_U06_huge_events_and_endless_lines_are_relayed_in_bounded_memory",),
    "U7": (
        FU + "test_U07_U08_malformed_upstream_http_is_a_502_protocol_error",
        FU + "test_U07_bad_chunk_framing_after_the_stream_started_is_never_a_clean_end",
    ),
    "U8": (FU + "test_U07_U08_malformed_upstream_http_is_a_502_protocol_error",),
    "U9": (PR + "test_upstream_statuses_headers_and_bodies_pass_through",),
    "U10": (
        FU + "test_U10_a_compression_bomb_passes_through_compressed_and_is_never_expanded",
        FU + "test_U10_the_gateway_process_still_serves_sessions_after_the_floods",
        "tests/test_proxy_streaming.py::test_compressed_and_binary_bodies_pass_through_byte_for_byte",
    ),
    "U11": (
        PF + "test_browser_disconnect_cancels_a_silent_upstream_within_a_second_or_so",
        PF + "test_browser_disconnect_before_the_response_started_cancels_the_upstream",
    ),
    "U12": (PR + "test_upstream_statuses_headers_and_bodies_pass_through",),
}

# Rows that truly do not apply, each with its one-line reason. (None today: every row of the
# catalogue applies to this gateway and is proven above.)
NOT_APPLICABLE: dict[str, str] = {}

# Where the proven outcome knowingly differs from the catalogue's wording, and why.
DEVIATIONS: dict[str, str] = {
    "R15": "409 session_ended (not 401): there is no login; the cookie is expired all the same",
    "R16": "409 session_ended like R15; the browser's next write starts a new session",
    "B18": "aiohttp's own parser 400 (text/plain) quotes up to ~100 bytes of the bad line",
    "B14": "pure-Python parser: a non-ASCII chunk size gives a plain 500 (aiohttp cannot encode "
    "its own 400 message); a 160-bit chunk size waits for that much body; never 2 requests",
    "U1": "no retries at all, not even for idempotent requests before any byte",
    "U5": "bytes are relayed without SSE parsing, so there is no per-line limit to enforce",
    "U6": "no upstream_event_too_large cap: memory is bounded by backpressure instead",
    "U7": "aiohttp's C parser stalls on a non-hex chunk size mid-body: the idle timeout ends it",
}


def catalogue_lines() -> list[tuple[str, str]]:
    """(row id, its line) for each row of the table in the "The catalogue" section of
    docs/reliability.md, in the page's order."""
    _, found, rest = CATALOGUE.read_text().partition("\n## The catalogue\n")
    assert found, "docs/reliability.md has no section 'The catalogue'"
    section = rest.split("\n## ", 1)[0]
    return [(m[1], m[0]) for m in re.finditer(r"^\| ([RBU]\d+) \|.*$", section, re.M)]


def short_name(node: str) -> str:
    """`tests/test_x.py::test_y` as the page names it: `test_x::test_y`."""
    path, _, name = node.partition("::")
    return f"{Path(path).stem}::{name}"


def _nodes() -> list[str]:
    return sorted({node for nodes in PROVEN.values() for node in nodes})


def test_every_catalogue_row_is_proven_or_explained() -> None:
    assert set(PROVEN) | set(NOT_APPLICABLE) == set(ROW_IDS)
    assert not set(PROVEN) & set(NOT_APPLICABLE)
    assert not MANDATORY & set(NOT_APPLICABLE), "a mandatory row was declared not applicable"
    assert all(PROVEN[row] for row in PROVEN)
    assert set(DEVIATIONS) <= set(ROW_IDS)
    # The catalogue itself lists exactly these rows, each once.
    assert sorted(row for row, _ in catalogue_lines()) == sorted(ROW_IDS)


@pytest.mark.parametrize("node", _nodes())
def test_every_referenced_test_exists(node: str) -> None:
    path, _, name = node.partition("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert callable(getattr(module, name, None)), f"{node} does not exist (renamed?)"


def test_each_row_of_the_page_names_its_tests() -> None:
    rows = dict(catalogue_lines())
    for row in ROW_IDS:
        assert row in rows, f"docs/reliability.md lacks row {row}"
        for node in PROVEN.get(row, ()):
            assert short_name(node) in rows[row], f"row {row} of docs/reliability.md lacks {node}"
        if row in DEVIATIONS:
            assert "⚑" in rows[row], f"row {row} deviates: docs/reliability.md marks it ⚑"


# -- dependency floors -----------------------------------------------------------------------

# The lowest versions without a published advisory that matters here (docs/reliability.md).
FLOORS = {"aiohttp": "3.14.3", "redis": "8.1.0"}


@pytest.mark.parametrize("dist", FLOORS)
def test_the_installed_dependencies_are_at_or_above_their_floors(dist: str) -> None:
    installed = Version(metadata.version(dist))
    assert installed >= Version(FLOORS[dist]), f"{dist} {installed} < {FLOORS[dist]}"


@pytest.mark.parametrize("dist", FLOORS)
def test_pyproject_declares_the_floors(dist: str) -> None:
    """A fresh install can never resolve below the floor (nor does the floor exclude it)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (requirement,) = [
        r for r in map(Requirement, project["dependencies"]) if r.name.lower() == dist
    ]
    floor = Version(FLOORS[dist])
    below = Version(f"{floor.major}.{floor.minor}.{floor.micro - 1}") if floor.micro else None
    assert requirement.specifier.contains(floor), str(requirement)
    if below is not None:
        assert not requirement.specifier.contains(below), str(requirement)
    assert not requirement.specifier.contains("3.13.5" if dist == "aiohttp" else "8.0.0")
