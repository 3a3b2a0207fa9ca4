"""Compiled HLO text, read back: which JAX operation each instruction came from. `lm.plan`
groups libtpu's per-instruction estimates by it, `benchmarks/throughput.py --profile` the
measured time of each kernel."""
import collections
import re
from collections.abc import Mapping

# opcodes whose time is their callees' (traced too): not kernels of their own
CONTROL_FLOW = ('conditional', 'while', 'call')


def operation_name(instruction: str) -> str:
  """The JAX operation a line of HLO text came from, named by its metadata (else the
  instruction's name), with `layers_N` for a layer's index, `bwd(...)` for the backward pass
  and no numbers at the end. Instructions that XLA combined from several operations (their
  metadata joins the names with ':') are named by the instruction ('all-reduce')."""
  op = re.search(r'op_name="([^"]*)"', instruction)
  name = op[1] if op and ':' not in op[1] else re.search(r'%([^ =]+)', instruction)[1]
  name = re.sub(r'layers_\d+', 'layers_N', name.replace('jit(train_step)/', ''))
  name = re.sub(r'transpose\(jvp\((.*?)\)\)', r'bwd(\1)', name).replace("\\'", "'")
  return re.sub(r'(\.(\d+|clone))+$', '', name)


def instructions(hlo: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, `operation_name`)} for the instructions of every computation."""
  found = {}
  for line in hlo.splitlines():
    # `%name = <shape> <opcode>(...)`: a tuple shape holds spaces and /*index=5*/ comments
    m = re.match(r'\s*(?:ROOT )?%([^ =]+) = .*? ([\w-]+)\(', line)
    if m:
      found[m[1]] = (m[2], operation_name(line))
  return found


def by_operation(hlo: str, by_instruction: Mapping[str, float]) -> collections.Counter:
  """Per-instruction amounts (a trace's kernel time) summed by `operation_name`, leaving out
  control flow, whose callees are traced on their own; an instruction not in `hlo` keeps its
  name."""
  table, summed = instructions(hlo), collections.Counter()
  for instruction, amount in by_instruction.items():
    opcode, operation = table.get(instruction, ('', instruction))
    if opcode not in CONTROL_FLOW:
      summed[operation] += amount
  return summed
