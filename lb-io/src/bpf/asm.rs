//! A small eBPF instruction builder: enough of the instruction set to write a classifier by hand,
//! readably, with named labels instead of counted jump offsets. No clang, no ELF, no relocations:
//! the only "relocation" is a map file descriptor loaded with [`Asm::ld_map_fd`].
//!
//! Encoding (linux/bpf.h, `struct bpf_insn`): 8 bytes — opcode, dst/src register nibbles, a signed
//! 16-bit offset and a signed 32-bit immediate. `ld_imm64` takes two slots.

/// An eBPF register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    /// Return value, helper results.
    R0 = 0,
    /// First argument; the program's context on entry.
    R1,
    /// Second argument.
    R2,
    /// Third argument.
    R3,
    /// Fourth argument.
    R4,
    /// Fifth argument.
    R5,
    /// Callee-saved.
    R6,
    /// Callee-saved.
    R7,
    /// Callee-saved.
    R8,
    /// Callee-saved.
    R9,
    /// Read-only frame pointer (stack grows down from it).
    R10,
}

/// Access width of a load or store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// 1 byte.
    B,
    /// 2 bytes.
    H,
    /// 4 bytes.
    W,
    /// 8 bytes.
    DW,
}

impl Size {
    const fn code(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
            Size::DW => 0x18,
        }
    }
}

/// A conditional jump's comparison (unsigned unless named otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// ==
    Eq,
    /// !=
    Ne,
    /// > (unsigned)
    Gt,
    /// >= (unsigned)
    Ge,
    /// < (unsigned)
    Lt,
}

impl Cond {
    const fn code(self) -> u8 {
        match self {
            Cond::Eq => 0x10,
            Cond::Gt => 0x20,
            Cond::Ge => 0x30,
            Cond::Ne => 0x50,
            Cond::Lt => 0xa0,
        }
    }
}

// Instruction classes and source flags.
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
const BPF_MEM: u8 = 0x60;
const BPF_IMM: u8 = 0x00;
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_ALU: u8 = 0x04;
const BPF_ADD: u8 = 0x00;
const BPF_LSH: u8 = 0x60;
const BPF_AND: u8 = 0x50;
const BPF_END: u8 = 0xd0;
/// With `BPF_END`: convert to big-endian (a byte swap on little-endian hosts).
const BPF_TO_BE: u8 = 0x08;
const BPF_MOV: u8 = 0xb0;
const BPF_JA: u8 = 0x00;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
/// `src_reg` of `ld_imm64` meaning "the immediate is a map fd; the kernel swaps in the map".
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// One encoded instruction, laid out as the kernel reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// dst register in the low nibble, src in the high one.
    pub regs: u8,
    /// Signed offset (memory access or jump).
    pub off: i16,
    /// Signed immediate.
    pub imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Self {
        Insn { code, regs: (dst as u8) | ((src as u8) << 4), off, imm }
    }
}

/// A jump target, created by [`Asm::new_label`] and placed by [`Asm::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// A label that was jumped to but never bound, or a jump too far for 16 bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    /// `bind` was never called for a label that a jump uses.
    #[error("label {0} is used by a jump but never bound")]
    Unbound(usize),
    /// The program is longer than a 16-bit jump offset reaches.
    #[error("jump from instruction {from} to {to} does not fit a 16-bit offset")]
    TooFar {
        /// Jump instruction index.
        from: usize,
        /// Target instruction index.
        to: usize,
    },
}

/// Builds a program instruction by instruction.
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    /// (instruction index, label) of every jump to patch.
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Asm::default()
    }

    /// A fresh label to jump to.
    pub fn new_label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Places `label` at the next instruction.
    pub fn bind(&mut self, label: Label) -> &mut Self {
        if let Some(slot) = self.labels.get_mut(label.0) {
            *slot = Some(self.insns.len());
        }
        self
    }

    fn push(&mut self, insn: Insn) -> &mut Self {
        self.insns.push(insn);
        self
    }

    /// `dst = src` (64-bit).
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0))
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, dst, Reg::R0, 0, imm))
    }

    /// `dst += imm` (64-bit).
    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | BPF_ADD | BPF_K, dst, Reg::R0, 0, imm))
    }

    /// `dst += src` (64-bit).
    pub fn add(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | BPF_ADD | BPF_X, dst, src, 0, 0))
    }

    /// `dst &= imm` (64-bit, imm sign-extended).
    pub fn and_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | BPF_AND | BPF_K, dst, Reg::R0, 0, imm))
    }

    /// `dst <<= imm` (64-bit).
    pub fn lsh_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | BPF_LSH | BPF_K, dst, Reg::R0, 0, imm))
    }

    /// `dst = htobe16(dst)`: the low 16 bits from network order to a number (upper bits cleared).
    pub fn be16(&mut self, dst: Reg) -> &mut Self {
        self.push(Insn::new(BPF_ALU | BPF_END | BPF_TO_BE, dst, Reg::R0, 0, 16))
    }

    /// `dst = *(size *)(src + off)`.
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(Insn::new(BPF_LDX | BPF_MEM | size.code(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = src`.
    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(Insn::new(BPF_STX | BPF_MEM | size.code(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = imm`.
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ST | BPF_MEM | size.code(), dst, Reg::R0, off, imm))
    }

    /// `dst = map` (the kernel replaces the fd with the map's address at load time).
    pub fn ld_map_fd(&mut self, dst: Reg, fd: i32) -> &mut Self {
        let regs = (dst as u8) | (BPF_PSEUDO_MAP_FD << 4);
        self.push(Insn { code: BPF_LD | BPF_DW_SIZE | BPF_IMM, regs, off: 0, imm: fd });
        self.push(Insn { code: 0, regs: 0, off: 0, imm: 0 })
    }

    /// `if dst <cond> src goto label`.
    pub fn jmp(&mut self, cond: Cond, dst: Reg, src: Reg, label: Label) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(Insn::new(BPF_JMP | cond.code() | BPF_X, dst, src, 0, 0))
    }

    /// `if dst <cond> imm goto label`.
    pub fn jmp_imm(&mut self, cond: Cond, dst: Reg, imm: i32, label: Label) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(Insn::new(BPF_JMP | cond.code() | BPF_K, dst, Reg::R0, 0, imm))
    }

    /// `goto label`.
    pub fn ja(&mut self, label: Label) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(Insn::new(BPF_JMP | BPF_JA, Reg::R0, Reg::R0, 0, 0))
    }

    /// Calls helper number `helper` (arguments in r1..r5, result in r0; r1..r5 are clobbered).
    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(Insn::new(BPF_JMP | BPF_CALL, Reg::R0, Reg::R0, 0, helper))
    }

    /// `return r0`.
    pub fn exit(&mut self) -> &mut Self {
        self.push(Insn::new(BPF_JMP | BPF_EXIT, Reg::R0, Reg::R0, 0, 0))
    }

    /// `r0 = imm; return r0`.
    pub fn ret(&mut self, imm: i32) -> &mut Self {
        self.mov_imm(Reg::R0, imm).exit()
    }

    /// Resolves every jump and returns the instructions.
    pub fn finish(mut self) -> Result<Vec<Insn>, AsmError> {
        for &(at, label) in &self.fixups {
            let to = self.labels.get(label.0).copied().flatten().ok_or(AsmError::Unbound(label.0))?;
            let rel = to as i64 - at as i64 - 1;
            let off = i16::try_from(rel).map_err(|_| AsmError::TooFar { from: at, to })?;
            if let Some(insn) = self.insns.get_mut(at) {
                insn.off = off;
            }
        }
        Ok(self.insns)
    }
}

/// `BPF_DW` as the size field of `ld_imm64`.
const BPF_DW_SIZE: u8 = 0x18;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alu_encodings_match_the_kernel_opcodes() {
        let mut a = Asm::new();
        a.add(Reg::R1, Reg::R2).and_imm(Reg::R3, 0xf).lsh_imm(Reg::R3, 2).be16(Reg::R4).ret(0);
        let insns = a.finish().unwrap();
        // BPF_ALU64|BPF_ADD|BPF_X, BPF_ALU64|BPF_AND|BPF_K, BPF_ALU64|BPF_LSH|BPF_K,
        // BPF_ALU|BPF_END|BPF_TO_BE (include/uapi/linux/bpf_common.h, bpf.h).
        let got: Vec<(u8, u8, i32)> = insns[..4].iter().map(|i| (i.code, i.regs, i.imm)).collect();
        assert_eq!(got, [(0x0f, 0x21, 0), (0x57, 0x03, 0xf), (0x67, 0x03, 2), (0xdc, 0x04, 16)]);
    }

    #[test]
    fn encodes_like_the_kernel_headers() {
        let mut a = Asm::new();
        let done = a.new_label();
        a.load(Size::W, Reg::R2, Reg::R1, 16) // r2 = *(u32 *)(r1 + 16)
            .jmp_imm(Cond::Eq, Reg::R2, 0, done)
            .ld_map_fd(Reg::R1, 7)
            .bind(done)
            .ret(2);
        let insns = a.finish().unwrap();
        // Byte-for-byte what `llvm-objdump -d` shows for the same source.
        assert_eq!(insns[0], Insn { code: 0x61, regs: 0x12, off: 16, imm: 0 });
        assert_eq!(insns[1], Insn { code: 0x15, regs: 0x02, off: 2, imm: 0 });
        assert_eq!(insns[2], Insn { code: 0x18, regs: 0x11, off: 0, imm: 7 });
        assert_eq!(insns[3], Insn { code: 0, regs: 0, off: 0, imm: 0 });
        assert_eq!(insns[4], Insn { code: 0xb7, regs: 0x00, off: 0, imm: 2 });
        assert_eq!(insns[5], Insn { code: 0x95, regs: 0, off: 0, imm: 0 });
    }

    #[test]
    fn an_unbound_label_is_an_error() {
        let mut a = Asm::new();
        let nowhere = a.new_label();
        a.ja(nowhere);
        assert_eq!(a.finish(), Err(AsmError::Unbound(0)));
    }
}
