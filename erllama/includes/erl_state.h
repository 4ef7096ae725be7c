// A sequence's state read without llama_synchronize(), for Context.state_get_parked: the
// public llama_state_seq_get_data() synchronizes the scheduler first, which races with a
// decode running in another thread. The caller synchronizes once, under the context lock,
// before it lets go of the lock. The members used are public members of llama_context.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../src/llama-context.h"

static size_t erl_state_seq_size_nosync(llama_context * ctx, llama_seq_id seq) {
    return ctx->state_seq_get_size(seq, 0);
}

static size_t erl_state_seq_get_nosync(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq) {
    return ctx->state_seq_get_data(seq, dst, size, 0);
}
