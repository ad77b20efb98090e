"""The pure parts of nodeagent.ebpf: compiler flags, the assembled C unit, struct mirrors, hook table."""

from __future__ import annotations

import ctypes
import ipaddress
import re

import pytest

from nodeagent.ebpf import loader, pins, structs


def test_cflags_carry_every_pod_setting() -> None:
    config = loader.PodConfig("28c73686-7ddf-5d45", ipaddress.IPv4Address("10.10.1.10"))
    flags = config.cflags()
    assert '-DNA_PIN_DIR="/sys/fs/bpf/nodeagent/28c73686-7ddf-5d45"' in flags
    assert "-DNA_POD_IP4=0x0a0a010aU" in flags
    assert {"-DNA_OUTBOUND_PORT=15001", "-DNA_INBOUND_PORT=15006", "-DNA_HBONE_PORT=15008"} <= set(flags)
    assert "-DNA_TUNNEL_MARK=0x539" in flags
    assert loader.PodConfig("u", None).cflags()[2] == "-DNA_POD_IP4=0x00000000U"


@pytest.mark.parametrize("uid", ["", "../etc", "a/b", ".hidden", "x" * 300])
def test_uids_that_cannot_name_a_pin_directory_are_refused(uid: str) -> None:
    with pytest.raises(ValueError):
        loader.PodConfig(uid, None)


def test_source_is_the_header_then_one_file_per_hook_and_names_its_flags() -> None:
    config = loader.PodConfig("uid-1", ipaddress.IPv4Address("10.0.0.1"))
    unit = loader.source(config)
    assert unit.startswith((loader.PROGRAMS_DIR / loader.HEADER).read_text())
    for hook in pins.HOOKS:
        assert (loader.PROGRAMS_DIR / hook.file).read_text() in unit
        assert re.search(rf"\bint {hook.function}\(", unit)
    annotated = loader.annotated_source(config)
    assert all(flag in annotated.split("*/")[0] for flag in config.cflags())
    assert "@" not in unit and "{{" not in unit  # configured by -D flags, no template placeholders


def test_every_map_the_header_pins_is_known_to_structs() -> None:
    header = (loader.PROGRAMS_DIR / loader.HEADER).read_text()
    pinned = set(re.findall(r'NA_PIN_DIR "/(map_\w+)"', header))
    assert pinned == set(structs.MAPS)


def test_mirror_layouts_and_encoding() -> None:
    assert ctypes.sizeof(structs.NaAddr4) == 8
    assert ctypes.sizeof(structs.NaOrig) == 16
    assert structs.NaOrig.cookie.offset == 8
    key = bytes(structs.NaAddr4.of("10.10.1.10", 8080))
    assert key == bytes([10, 10, 1, 10]) + (8080).to_bytes(2, "big") + b"\0\0"
    orig = structs.NaOrig.from_buffer_copy(bytes([10, 10, 2, 10]) + (443).to_bytes(2, "big") + b"\1\0" + bytes(8))
    assert orig.address == (ipaddress.IPv4Address("10.10.2.10"), 443)


def test_hooks_have_distinct_pins_and_kernel_name_lengths() -> None:
    assert len({h.prog_pin for h in pins.HOOKS} | {h.link_pin for h in pins.HOOKS}) == 2 * len(pins.HOOKS)
    assert all(len(h.function) <= 15 for h in pins.HOOKS)  # BPF_OBJ_NAME_LEN - 1
    assert {h.target for h in pins.HOOKS} == {"cgroup", "netns"}


def test_map_layouts_match_the_mirrors() -> None:
    assert set(loader.MAP_LAYOUT) == set(structs.MAPS)
    assert loader.MAP_LAYOUT[structs.MAP_ORIG_DST] == (ctypes.sizeof(structs.NaAddr4), ctypes.sizeof(structs.NaOrig))
    assert loader.MAP_LAYOUT[structs.MAP_BYPASS][0] == ctypes.sizeof(structs.NaAddr4)
