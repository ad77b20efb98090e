"""The pure parts of nodeagent.ebpf: compiler flags, the assembled C unit, struct mirrors, hook table."""

from __future__ import annotations

import ctypes
import ipaddress
import re

import pytest

from nodeagent.ebpf import loader, maps, pins, structs


def test_cflags_carry_the_node_settings_and_nothing_of_a_pod() -> None:
    flags = loader.BuildConfig().cflags()
    assert {"-DNA_OUTBOUND_PORT=15001", "-DNA_INBOUND_PORT=15006", "-DNA_HBONE_PORT=15008"} <= set(flags)
    assert "-DNA_TUNNEL_MARK=0x539" in flags
    assert not any("POD" in flag or "PIN" in flag for flag in flags)  # one compile serves every pod


def test_a_pods_settings_are_its_na_config_value() -> None:
    config = loader.PodConfig("28c73686-7ddf-5d45", ipaddress.IPv4Address("10.10.1.10"))
    assert config.pin_dir == "/sys/fs/bpf/nodeagent/28c73686-7ddf-5d45"
    assert config.na_config() == bytes([10, 10, 1, 10]) + bytes(4)  # network byte order, then pad
    assert loader.PodConfig("u", None).na_config() == bytes(8)
    assert structs.NaConfig.from_buffer_copy(config.na_config()).pod_ip == ipaddress.IPv4Address("10.10.1.10")
    assert structs.NaConfig.from_buffer_copy(bytes(8)).pod_ip is None


@pytest.mark.parametrize("uid", ["", "../etc", "a/b", ".hidden", "x" * 300, "uid\n"])
def test_uids_that_cannot_name_a_pin_directory_are_refused(uid: str) -> None:
    with pytest.raises(ValueError):
        loader.PodConfig(uid, None)


def test_source_is_the_header_then_one_file_per_hook_and_names_its_flags() -> None:
    unit = loader.source()
    assert unit.startswith((loader.PROGRAMS_DIR / loader.HEADER).read_text())
    for hook in pins.HOOKS:
        assert (loader.PROGRAMS_DIR / hook.file).read_text() in unit
        assert re.search(rf"\bint {hook.function}\(", unit)
    build = loader.BuildConfig()
    annotated = loader.annotated_source(build)
    assert all(flag in annotated.split("*/")[0] for flag in build.cflags())
    assert "@" not in unit and "{{" not in unit  # configured by -D flags, no template placeholders


def test_every_map_the_header_declares_is_pinned_by_structs() -> None:
    header = (loader.PROGRAMS_DIR / loader.HEADER).read_text()
    declared = re.findall(r'^BPF_TABLE\("\w+", [^;]*?, (na_\w+), [^;]*\);', header, re.M)
    assert sorted(structs.map_pin(name) for name in declared) == sorted(structs.MAPS)
    assert all(len(name) <= 15 for name in declared)  # BPF_OBJ_NAME_LEN - 1
    with pytest.raises(ValueError):
        structs.map_pin("other_map")


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


def test_outbound_capture_hooks_both_socket_families_with_one_decision() -> None:
    """An AF_INET6 socket connecting to ::ffff:a.b.c.d (Java's and .NET's dual-mode sockets reaching IPv4) runs
    cgroup/connect6 and never connect4: without a connect6 hook such connections leave the pod uncaptured. Both
    hooks make the one decision of nodeagent.h, so what is skipped cannot drift apart between them."""
    by_attach = {hook.attach_type: hook for hook in pins.HOOKS}
    assert int(maps.AttachType.CGROUP_INET6_CONNECT) == 11  # enum bpf_attach_type: BPF_CGROUP_INET6_CONNECT
    for attach in (maps.AttachType.CGROUP_INET4_CONNECT, maps.AttachType.CGROUP_INET6_CONNECT):
        hook = by_attach[attach]
        assert (hook.prog_type, hook.target) == (maps.ProgType.CGROUP_SOCK_ADDR, "cgroup")
        assert "na_capture_connect(ctx, " in (loader.PROGRAMS_DIR / hook.file).read_text()


def test_stat_names_follow_the_headers_enum() -> None:
    header = (loader.PROGRAMS_DIR / loader.HEADER).read_text()
    enum = {name.lower(): int(n) for name, n in re.findall(r"^\s*NA_STAT_(\w+) = (\d+),", header, re.M)}
    assert enum.pop("max") == structs.STAT_SLOTS  # the map's size: unchanged, so pinned maps are adopted
    assert sorted(enum.values()) == list(range(len(enum)))
    assert tuple(sorted(enum, key=enum.__getitem__)) == structs.STAT_NAMES


def _insn(code: int, src: int = 0, imm: int = 0) -> bytes:
    return bytes([code, src << 4]) + (0).to_bytes(2, "little") + imm.to_bytes(4, "little", signed=True)


def LD_MAP(fd: int) -> bytes:  # ld_imm64 r0, map fd (two slots)
    return _insn(0x18, 1, fd) + _insn(0, 0, 0)


def LD_VALUE(fd: int) -> bytes:  # ld_imm64 r0, address of the map's value + 4
    return _insn(0x18, 2, fd) + _insn(0, 0, 4)


LD_CONST = _insn(0x18, 0, 7) + _insn(0, 0, 7)  # a plain 64-bit constant: not a map
CALL = _insn(0x85, 0, 1)  # call bpf_map_lookup_elem
EXIT = _insn(0x95)


@pytest.mark.parametrize(
    ("insns", "fds", "want"),
    [
        (LD_MAP(7) + CALL + EXIT, {7: 42}, LD_MAP(42) + CALL + EXIT),
        (LD_MAP(7) + LD_MAP(9) + LD_MAP(7), {7: 100, 9: 101}, LD_MAP(100) + LD_MAP(101) + LD_MAP(100)),
        (LD_VALUE(5) + EXIT, {5: 6}, LD_VALUE(6) + EXIT),
        (LD_CONST + CALL + EXIT, {}, LD_CONST + CALL + EXIT),  # a constant that happens to be 7 stays 7
        (_insn(0xB7, 0, 7) + EXIT, {7: 8}, _insn(0xB7, 0, 7) + EXIT),  # mov r0, 7: not a load
    ],
)
def test_relocate_points_every_map_load_at_the_pods_map(insns: bytes, fds: dict[int, int], want: bytes) -> None:
    assert loader.relocate(insns, fds) == want
    assert loader.map_references(want) == tuple(fds[fd] for fd in loader.map_references(insns))


def test_relocate_refuses_what_it_cannot_map() -> None:
    with pytest.raises(ValueError, match="map fd 8"):
        loader.relocate(LD_MAP(7) + LD_MAP(8), {7: 1})  # never left pointing at whatever fd 8 is now
    with pytest.raises(ValueError, match="whole BPF instructions"):
        loader.relocate(EXIT[:5], {})
    # The second slot of an LD_IMM64 is data: an imm there that looks like an LD_IMM64 opcode is skipped.
    tricky = _insn(0x18, 0, 0) + _insn(0x18, 1, 3)
    assert loader.relocate(tricky, {}) == tricky


def test_a_kernel_refusing_the_reference_maps_is_unavailable_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tags are read from one load on throwaway maps at start-up; a refusal there (EPERM under a memlock
    limit, say) must be EbpfUnavailable, which `--capture auto` turns into iptables, not an escaping error."""
    import errno

    from nodeagent.ebpf import maps

    def refuse(*args: object, **kwargs: object) -> object:
        raise maps.BpfError(errno.EPERM, "MAP_CREATE refused")

    monkeypatch.setattr(maps, "map_create", refuse)
    layout = maps.MapInfo(id=0, type=2, name="na_config", key_size=4, value_size=8, max_entries=1, flags=0)
    program = loader.Compiled(b"GPL", {}, {3: layout}, None)
    with pytest.raises(loader.EbpfUnavailable, match="MAP_CREATE refused"):
        loader._reference_tags(program)
