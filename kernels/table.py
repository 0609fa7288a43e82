"""The layout of a solver coefficient table, shared by the table builder, the fused kernel and its reference.

A table has one row per step, of shape (1 + MAX_WRITES, FIXED_INPUTS + K): output 0 is the next sample, outputs
1.. are history slots written at that step (their indices in ``write_slots``, -1 for none). The input columns
are the current sample x, the guided prediction v, the noise z, then the K history slots.
"""

#: history writes one step may make (UniPC keeps the new model output and the corrected sample)
MAX_WRITES = 2
#: fixed input columns before the history slots
INPUT_X, INPUT_V, INPUT_Z = 0, 1, 2
FIXED_INPUTS = 3
