"""An eBPF instruction encoder: named instructions in, the kernel's bytes out.

Each instruction is the kernel's 8-byte `struct bpf_insn` (opcode, dst and src
register in one byte, a signed 16-bit offset, a signed 32-bit immediate);
`ld_map_fd` is the one 16-byte instruction (`lddw`), which the verifier
rewrites into the address of the map whose fd it carries. Jumps name a `Label`
instead of counting instructions by hand; `assemble` resolves them, so a
program reads like the C it stands for and an edit cannot silently shift a
branch target.

Only what lazyd's programs need is here; every name follows the kernel's
`BPF_*` macros (include/uapi/linux/bpf.h, linux/bpf_common.h).
"""

from __future__ import annotations

import enum
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass


class Reg(enum.IntEnum):
    """The eBPF registers: r0 result, r1-r5 arguments (clobbered by calls), r6-r9
    kept across calls, r10 the read-only frame pointer (the stack grows down)."""

    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10


class Size(enum.IntEnum):
    """Memory access widths (the BPF_SIZE bits of an opcode)."""

    W = 0x00  # 4 bytes
    H = 0x08  # 2 bytes
    B = 0x10  # 1 byte
    DW = 0x18  # 8 bytes


# Instruction classes.
_LD, _LDX, _ST, _STX, _ALU, _JMP, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
# Modes and sources.
_IMM, _MEM, _ATOMIC = 0x00, 0x60, 0xC0
_K, _X = 0x00, 0x08
# ALU operations.
_ADD, _AND, _MOV = 0x00, 0x50, 0xB0
# Jump operations.
_JA, _CALL, _EXIT = 0x00, 0x80, 0x90


class Cond(enum.IntEnum):
    """Conditional jump operations (64-bit compares)."""

    EQ = 0x10
    GT = 0x20
    GE = 0x30
    NE = 0x50
    LT = 0xA0
    LE = 0xB0


# src_reg value of an `lddw` whose immediate is a map fd.
PSEUDO_MAP_FD = 1


class Helper(enum.IntEnum):
    """The kernel helpers lazyd calls (enum bpf_func_id)."""

    MAP_LOOKUP_ELEM = 1
    SK_RELEASE = 86
    SK_ASSIGN = 124


@dataclass(frozen=True)
class Label:
    """A jump target: place it in the instruction list where the target is."""

    name: str


@dataclass(frozen=True)
class Insn:
    """One encoded instruction slot; `target` names a label for jumps."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: Label | None = None

    def encode(self, off: int | None = None) -> bytes:
        """The 8 bytes of this slot, with `off` replacing the offset if given."""
        # The two registers share one byte as C bitfields, whose order follows
        # the machine's byte order.
        little = sys.byteorder == "little"
        regs = (self.src << 4) | self.dst if little else (self.dst << 4) | self.src
        return struct.pack("=BBhi", self.code, regs, self.off if off is None else off, self.imm)


Item = Insn | Label


def mov(dst: Reg, src: Reg) -> Insn:
    """dst = src (64-bit)."""
    return Insn(_ALU64 | _MOV | _X, dst, src)


def mov_imm(dst: Reg, imm: int) -> Insn:
    """dst = imm (sign-extended 32-bit immediate)."""
    return Insn(_ALU64 | _MOV | _K, dst, imm=imm)


def add_imm(dst: Reg, imm: int) -> Insn:
    """dst += imm (64-bit)."""
    return Insn(_ALU64 | _ADD | _K, dst, imm=imm)


def and_imm(dst: Reg, imm: int) -> Insn:
    """dst &= imm (64-bit)."""
    return Insn(_ALU64 | _AND | _K, dst, imm=imm)


def ldx(size: Size, dst: Reg, src: Reg, off: int) -> Insn:
    """dst = *(size *)(src + off)."""
    return Insn(_LDX | _MEM | size, dst, src, off)


def stx(size: Size, dst: Reg, off: int, src: Reg) -> Insn:
    """*(size *)(dst + off) = src."""
    return Insn(_STX | _MEM | size, dst, src, off)


def st_imm(size: Size, dst: Reg, off: int, imm: int) -> Insn:
    """*(size *)(dst + off) = imm."""
    return Insn(_ST | _MEM | size, dst, off=off, imm=imm)


def atomic_add(size: Size, dst: Reg, off: int, src: Reg) -> Insn:
    """lock *(size *)(dst + off) += src (size W or DW)."""
    return Insn(_STX | _ATOMIC | size, dst, src, off, imm=_ADD)


def jmp(target: Label) -> Insn:
    """goto target."""
    return Insn(_JMP | _JA, target=target)


def jmp_imm(cond: Cond, dst: Reg, imm: int, target: Label) -> Insn:
    """if dst <cond> imm goto target."""
    return Insn(_JMP | cond | _K, dst, imm=imm, target=target)


def jmp_reg(cond: Cond, dst: Reg, src: Reg, target: Label) -> Insn:
    """if dst <cond> src goto target."""
    return Insn(_JMP | cond | _X, dst, src, target=target)


def call(helper: Helper) -> Insn:
    """r0 = helper(r1, ..., r5); r1-r5 are clobbered."""
    return Insn(_JMP | _CALL, imm=helper)


def exit_() -> Insn:
    """return r0."""
    return Insn(_JMP | _EXIT)


def ld_map_fd(dst: Reg, fd: int) -> tuple[Insn, Insn]:
    """dst = the map behind fd: a 16-byte lddw the verifier resolves."""
    return (Insn(_LD | _IMM | Size.DW, dst, PSEUDO_MAP_FD, imm=fd), Insn(0))


def assemble(items: Iterable[Item | tuple[Insn, Insn]]) -> bytes:
    """The program's bytes, with every jump's offset resolved from its label.

    A jump offset counts 8-byte slots from the instruction after the jump.
    Raises ValueError for a label placed twice, a jump to a missing label, or
    an offset that does not fit in 16 bits.
    """
    slots: list[Insn] = []
    labels: dict[Label, int] = {}
    for item in items:
        if isinstance(item, Label):
            if item in labels:
                raise ValueError(f"label {item.name!r} placed twice")
            labels[item] = len(slots)
        elif isinstance(item, Insn):
            slots.append(item)
        else:
            slots.extend(item)
    out = bytearray()
    for index, insn in enumerate(slots):
        if insn.target is None:
            out += insn.encode()
            continue
        if insn.target not in labels:
            raise ValueError(f"jump to label {insn.target.name!r}, which is never placed")
        off = labels[insn.target] - (index + 1)
        if not -(1 << 15) <= off < (1 << 15):
            raise ValueError(f"jump to {insn.target.name!r} is too far ({off} slots)")
        out += insn.encode(off)
    return bytes(out)
