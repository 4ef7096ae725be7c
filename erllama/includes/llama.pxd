# Declarations of the parts of llama.h / ggml.h / ggml-backend.h that erllama uses.
# Functions that can run C++ code that throws are declared `except +` so no C++ exception
# ever unwinds into Python.

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector


cdef extern from "ggml.h" nogil:
    enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_F16
        GGML_TYPE_Q4_0
        GGML_TYPE_Q4_1
        GGML_TYPE_Q5_0
        GGML_TYPE_Q5_1
        GGML_TYPE_Q8_0
        GGML_TYPE_IQ4_NL
        GGML_TYPE_BF16

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text, void * user_data) noexcept
    ctypedef cbool (*ggml_abort_callback)(void * data) noexcept


cdef extern from "ggml-backend.h" nogil:
    ctypedef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_device * ggml_backend_dev_t
    ctypedef struct ggml_backend_reg:
        pass
    ctypedef ggml_backend_reg * ggml_backend_reg_t

    enum ggml_backend_dev_type:
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL

    size_t ggml_backend_dev_count() except +
    ggml_backend_dev_t ggml_backend_dev_get(size_t index) except +
    const char * ggml_backend_dev_name(ggml_backend_dev_t device) except +
    const char * ggml_backend_dev_description(ggml_backend_dev_t device) except +
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total) except +
    ggml_backend_dev_type ggml_backend_dev_get_type "ggml_backend_dev_type"(ggml_backend_dev_t device) except +
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device) except +
    size_t ggml_backend_reg_count() except +
    ggml_backend_reg_t ggml_backend_reg_get(size_t index) except +
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg) except +


cdef extern from "llama.h" nogil:
    ctypedef int32_t llama_pos
    ctypedef int32_t llama_token
    ctypedef int32_t llama_seq_id

    int LLAMA_DEFAULT_SEED

    struct llama_vocab:
        pass
    struct llama_model:
        pass
    struct llama_context:
        pass
    struct llama_sampler:
        pass
    struct llama_adapter_lora:
        pass
    struct llama_memory_i:
        pass
    ctypedef llama_memory_i * llama_memory_t

    enum llama_vocab_type:
        pass

    enum llama_ftype:
        pass

    enum llama_split_mode:
        LLAMA_SPLIT_MODE_NONE
        LLAMA_SPLIT_MODE_LAYER
        LLAMA_SPLIT_MODE_ROW
        LLAMA_SPLIT_MODE_TENSOR

    enum llama_load_mode:
        LLAMA_LOAD_MODE_AUTO
        LLAMA_LOAD_MODE_NONE
        LLAMA_LOAD_MODE_MMAP
        LLAMA_LOAD_MODE_MLOCK
        LLAMA_LOAD_MODE_MMAP_MLOCK
        LLAMA_LOAD_MODE_DIRECT_IO

    enum llama_pooling_type:
        LLAMA_POOLING_TYPE_UNSPECIFIED
        LLAMA_POOLING_TYPE_NONE
        LLAMA_POOLING_TYPE_MEAN
        LLAMA_POOLING_TYPE_CLS
        LLAMA_POOLING_TYPE_LAST
        LLAMA_POOLING_TYPE_RANK

    enum llama_flash_attn_type:
        LLAMA_FLASH_ATTN_TYPE_AUTO
        LLAMA_FLASH_ATTN_TYPE_DISABLED
        LLAMA_FLASH_ATTN_TYPE_ENABLED

    ctypedef struct llama_token_data:
        llama_token id
        float logit
        float p

    ctypedef struct llama_token_data_array:
        llama_token_data * data
        size_t size
        int64_t selected
        cbool sorted

    ctypedef struct llama_batch:
        int32_t n_tokens
        llama_token * token
        float * embd
        llama_pos * pos
        int32_t * n_seq_id
        llama_seq_id ** seq_id
        int8_t * logits

    struct llama_model_params:
        int32_t n_gpu_layers
        llama_split_mode split_mode
        llama_load_mode load_mode
        int32_t main_gpu
        const float * tensor_split
        cbool vocab_only
        cbool check_tensors

    struct llama_context_params:
        uint32_t n_ctx
        uint32_t n_batch
        uint32_t n_ubatch
        uint32_t n_seq_max
        int32_t n_threads
        int32_t n_threads_batch
        llama_pooling_type pooling_type
        llama_flash_attn_type flash_attn_type
        ggml_type type_k
        ggml_type type_v
        ggml_abort_callback abort_callback
        void * abort_callback_data
        cbool embeddings
        cbool offload_kqv
        cbool no_perf
        cbool swa_full
        cbool kv_unified

    ctypedef struct llama_sampler_chain_params:
        cbool no_perf

    ctypedef struct llama_chat_message:
        const char * role
        const char * content

    const char * llama_ftype_name(llama_ftype ftype) except +

    llama_model_params llama_model_default_params()
    llama_context_params llama_context_default_params()
    llama_sampler_chain_params llama_sampler_chain_default_params()

    void llama_backend_init() except +
    void llama_log_set(ggml_log_callback log_callback, void * user_data)

    llama_model * llama_model_load_from_file(const char * path_model, llama_model_params params) except +
    void llama_model_free(llama_model * model) except +
    llama_context * llama_init_from_model(llama_model * model, llama_context_params params) except +
    void llama_free(llama_context * ctx) except +

    size_t llama_max_devices()
    size_t llama_max_parallel_sequences()
    const char * llama_print_system_info() except +

    uint32_t llama_n_ctx(const llama_context * ctx)
    uint32_t llama_n_ctx_seq(const llama_context * ctx)
    uint32_t llama_n_batch(const llama_context * ctx)
    uint32_t llama_n_ubatch(const llama_context * ctx)
    uint32_t llama_n_seq_max(const llama_context * ctx)
    llama_memory_t llama_get_memory(const llama_context * ctx)
    llama_pooling_type llama_get_pooling_type "llama_pooling_type"(const llama_context * ctx)

    const llama_vocab * llama_model_get_vocab(const llama_model * model)
    int32_t llama_model_n_ctx_train(const llama_model * model)
    int32_t llama_model_n_embd(const llama_model * model)
    int32_t llama_model_n_layer(const llama_model * model)
    int32_t llama_model_n_head(const llama_model * model)
    int32_t llama_model_n_head_kv(const llama_model * model)
    int32_t llama_model_n_swa(const llama_model * model)
    int32_t llama_vocab_n_tokens(const llama_vocab * vocab)
    llama_vocab_type llama_get_vocab_type "llama_vocab_type"(const llama_vocab * vocab)

    int32_t llama_model_meta_val_str(const llama_model * model, const char * key, char * buf, size_t buf_size) except +
    int32_t llama_model_meta_count(const llama_model * model) except +
    int32_t llama_model_meta_key_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size) except +
    int32_t llama_model_meta_val_str_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size) except +
    int32_t llama_model_desc(const llama_model * model, char * buf, size_t buf_size) except +
    llama_ftype llama_model_ftype(const llama_model * model)
    uint64_t llama_model_size(const llama_model * model)
    uint64_t llama_model_n_params(const llama_model * model)
    const char * llama_model_chat_template(const llama_model * model, const char * name) except +
    cbool llama_model_has_encoder(const llama_model * model)
    cbool llama_model_is_recurrent(const llama_model * model)
    cbool llama_model_is_hybrid(const llama_model * model)

    llama_adapter_lora * llama_adapter_lora_init(llama_model * model, const char * path_lora) except +
    void llama_adapter_lora_free(llama_adapter_lora * adapter) except +
    int32_t llama_set_adapters_lora(llama_context * ctx, llama_adapter_lora ** adapters, size_t n_adapters, float * scales) except +

    void llama_memory_clear(llama_memory_t mem, cbool data) except +
    cbool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1) except +
    llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id) except +
    llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id) except +
    void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) except +

    size_t llama_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id) except +
    size_t llama_state_seq_get_data(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id) except +
    size_t llama_state_seq_set_data(llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id) except +

    llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max) except +
    void llama_batch_free(llama_batch batch)
    int32_t llama_decode(llama_context * ctx, llama_batch batch) except +

    void llama_set_embeddings(llama_context * ctx, cbool embeddings) except +
    void llama_set_abort_callback(llama_context * ctx, ggml_abort_callback abort_callback, void * abort_callback_data)
    void llama_synchronize(llama_context * ctx) except +
    float * llama_get_logits_ith(llama_context * ctx, int32_t i) except +
    float * llama_get_embeddings_ith(llama_context * ctx, int32_t i) except +
    float * llama_get_embeddings_seq(llama_context * ctx, llama_seq_id seq_id) except +

    const char * llama_vocab_get_text(const llama_vocab * vocab, llama_token token) except +
    cbool llama_vocab_is_eog(const llama_vocab * vocab, llama_token token) except +
    cbool llama_vocab_is_control(const llama_vocab * vocab, llama_token token) except +
    llama_token llama_vocab_bos(const llama_vocab * vocab)
    llama_token llama_vocab_eos(const llama_vocab * vocab)
    llama_token llama_vocab_eot(const llama_vocab * vocab)
    llama_token llama_vocab_nl(const llama_vocab * vocab)
    cbool llama_vocab_get_add_bos(const llama_vocab * vocab)
    cbool llama_vocab_get_add_eos(const llama_vocab * vocab)

    int32_t llama_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                           llama_token * tokens, int32_t n_tokens_max,
                           cbool add_special, cbool parse_special) except +
    int32_t llama_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                                 int32_t length, int32_t lstrip, cbool special) except +
    int32_t llama_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                             char * text, int32_t text_len_max,
                             cbool remove_special, cbool unparse_special) except +

    int32_t llama_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg,
                                      cbool add_ass, char * buf, int32_t length) except +
    int32_t llama_chat_builtin_templates(const char ** output, size_t len) except +

    void llama_sampler_accept(llama_sampler * smpl, llama_token token) except +
    void llama_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p) except +
    void llama_sampler_reset(llama_sampler * smpl) except +
    void llama_sampler_free(llama_sampler * smpl) except +
    llama_sampler * llama_sampler_chain_init(llama_sampler_chain_params params) except +
    void llama_sampler_chain_add(llama_sampler * chain, llama_sampler * smpl) except +
    int32_t llama_sampler_chain_n(const llama_sampler * chain) except +
    llama_sampler * llama_sampler_init_greedy() except +
    llama_sampler * llama_sampler_init_dist(uint32_t seed) except +
    llama_sampler * llama_sampler_init_top_k(int32_t k) except +
    llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep) except +
    llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep) except +
    llama_sampler * llama_sampler_init_temp(float t) except +
    llama_sampler * llama_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str,
                                               const char * grammar_root) except +
    llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n, float penalty_repeat,
                                                 float penalty_freq, float penalty_present) except +
    uint32_t llama_sampler_get_seed(const llama_sampler * smpl) except +
    llama_token llama_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx) except +


cdef extern from "erl_helpers.h" nogil:
    ctypedef void (*erl_emit_fn)(int level, const char * line, size_t n) noexcept
    void erl_log_callback(ggml_log_level level, const char * text, void * user_data) noexcept
    void erl_log_flush() noexcept
    vector[string] erl_log_recent() except +
    void erl_log_clear_recent() noexcept
    void erl_log_set_min_level(int level) noexcept
    void erl_log_set_emit(erl_emit_fn fn) noexcept
    cbool erl_abort_callback(void * data) noexcept
    void erl_flag_set(int * flag, int value) noexcept
    int erl_flag_get(int * flag) noexcept
    uint32_t erl_crc32c(uint32_t crc, const unsigned char * p, size_t n) noexcept

cdef extern from "erl_state.h" nogil:
    size_t erl_state_seq_size_nosync(llama_context * ctx, llama_seq_id seq) except +
    size_t erl_state_seq_get_nosync(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq) except +
