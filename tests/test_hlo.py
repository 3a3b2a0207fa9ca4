"""lm.planning.hlo: compiled HLO text read back, on a hand-written module shaped like XLA's output."""
# ruff: noqa: E501 (HLO instructions are written on one line each, as XLA writes them)
from lm.planning import hlo

MODULE = '''HloModule jit_train_step, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  ROOT %add_fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, calls=%f.2, metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/embed/jit(_take)/scatter-add" source_file="m.py"}
}

ENTRY %main.10 (a: f32[4,8]) -> f32[4,8] {
  %ynn_fusion.12 = f32[4,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%f.1, metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/layers_0/mlp/wi/dot_general"}
  %ynn_fusion.13 = f32[4,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%f.1, metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/layers_11/mlp/wi/dot_general"}
  %all-reduce.62 = (f32[64,128]{1,0}, f32[128]{0}, /*index=2*/f32[128]{0}) all-reduce(%x, %y, %z), replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(train_step)/a/reduce_sum:jit(train_step)/b/dot_general"}
  %while.1 = (s32[], f32[4]{0}) while(%t), condition=%c, body=%body, metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/embed/jit(_take)/scatter-add"}
  ROOT %wrapped_copy.19 = f32[4,8]{1,0} fusion(%ynn_fusion.12), kind=kLoop, calls=%w.19
}
'''


def test_instructions_are_named_by_their_operation_and_summed():
  table = hlo.instructions(MODULE)
  assert table['ynn_fusion.13'] == ('fusion', 'bwd(Transformer)/layers_N/mlp/wi/dot_general')
  assert table['all-reduce.62'] == ('all-reduce', 'all-reduce')   # combined: the instruction
  assert table['while.1'][0] == 'while' and table['wrapped_copy.19'] == ('fusion', 'wrapped_copy')
  # a loop's time is its body's kernels', traced on their own; an unknown instruction keeps
  # its name
  assert hlo.by_operation(MODULE, {'ynn_fusion.12': 3, 'ynn_fusion.13': 5, 'all-reduce.62': 7,
                                   'while.1': 100, 'add_fusion.2': 11, 'wrapped_copy.19': 2,
                                   'elsewhere.4': 1}) == {
      'bwd(Transformer)/layers_N/mlp/wi/dot_general': 8, 'all-reduce': 7,
      'bwd(Transformer)/embed/jit(_take)/scatter-add': 11, 'wrapped_copy': 2, 'elsewhere.4': 1}
