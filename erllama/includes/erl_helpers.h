// Small C++ helpers compiled into erllama._native: log capture, abort flag, CRC32C.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include "ggml.h"

// ---- log capture --------------------------------------------------------------------
// llama.cpp logs in fragments; level CONT (5) continues the previous fragment. Lines are
// assembled per thread, the last warning/error lines of each thread are kept so a failed
// load can be classified, and only lines at or above the threshold cross into Python
// (which costs the GIL).

typedef void (*erl_emit_fn)(int level, const char * line, size_t n);

static std::atomic<int> erl_log_min_level{GGML_LOG_LEVEL_WARN};
static std::atomic<erl_emit_fn> erl_log_emit{nullptr};
static const size_t ERL_LOG_KEEP = 16;

struct erl_log_state {
    std::string cur;
    int cur_level = GGML_LOG_LEVEL_INFO;
    std::deque<std::string> recent;
};

static erl_log_state & erl_log_tl() {
    static thread_local erl_log_state st;
    return st;
}

static void erl_log_line(erl_log_state & st, int level, const std::string & line) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        st.recent.push_back(std::string(1, (char) ('0' + level)) + line);
        while (st.recent.size() > ERL_LOG_KEEP) st.recent.pop_front();
    }
    erl_emit_fn emit = erl_log_emit.load(std::memory_order_relaxed);
    if (emit && level >= erl_log_min_level.load(std::memory_order_relaxed)) {
        emit(level, line.data(), line.size());
    }
}

static void erl_log_callback(enum ggml_log_level level, const char * text, void *) noexcept {
    try {
        erl_log_state & st = erl_log_tl();
        int lvl = (int) level;
        if (lvl == GGML_LOG_LEVEL_CONT) {
            lvl = st.cur_level;
        } else if (!st.cur.empty()) {
            erl_log_line(st, st.cur_level, st.cur);
            st.cur.clear();
        }
        st.cur_level = lvl;
        if (text) st.cur += text;
        size_t pos;
        while ((pos = st.cur.find('\n')) != std::string::npos) {
            erl_log_line(st, lvl, st.cur.substr(0, pos));
            st.cur.erase(0, pos + 1);
        }
    } catch (...) {
    }
}

static void erl_log_flush() noexcept {
    try {
        erl_log_state & st = erl_log_tl();
        if (!st.cur.empty()) {
            erl_log_line(st, st.cur_level, st.cur);
            st.cur.clear();
        }
    } catch (...) {
    }
}

static void erl_log_clear_recent() noexcept {
    try {
        erl_log_state & st = erl_log_tl();
        st.recent.clear();
        st.cur.clear();
    } catch (...) {
    }
}

static std::vector<std::string> erl_log_recent() {
    erl_log_flush();
    erl_log_state & st = erl_log_tl();
    return std::vector<std::string>(st.recent.begin(), st.recent.end());
}

static void erl_log_set_min_level(int level) noexcept { erl_log_min_level.store(level); }
static void erl_log_set_emit(erl_emit_fn fn) noexcept { erl_log_emit.store(fn); }

// ---- abort flag ----------------------------------------------------------------------
// Read by ggml's compute threads between graph nodes while the decode runs without the GIL.

static bool erl_abort_callback(void * data) noexcept {
    return __atomic_load_n((int *) data, __ATOMIC_RELAXED) != 0;
}
static void erl_flag_set(int * flag, int value) noexcept { __atomic_store_n(flag, value, __ATOMIC_RELAXED); }
static int erl_flag_get(int * flag) noexcept { return __atomic_load_n(flag, __ATOMIC_RELAXED); }

// ---- CRC32C (Castagnoli, reflected 0x82F63B78, init/xorout ~0) -------------------------

static uint32_t erl_crc32c_table[8][256];
static std::atomic<int> erl_crc32c_ready{0};

static void erl_crc32c_init() noexcept {
    if (erl_crc32c_ready.load()) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        erl_crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = erl_crc32c_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = erl_crc32c_table[0][c & 0xff] ^ (c >> 8);
            erl_crc32c_table[t][i] = c;
        }
    }
    erl_crc32c_ready.store(1);
}

static uint32_t erl_crc32c_sw(uint32_t crc, const unsigned char * p, size_t n) noexcept {
    crc = ~crc;
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        v ^= crc;
        crc = erl_crc32c_table[7][v & 0xff] ^ erl_crc32c_table[6][(v >> 8) & 0xff] ^
              erl_crc32c_table[5][(v >> 16) & 0xff] ^ erl_crc32c_table[4][(v >> 24) & 0xff] ^
              erl_crc32c_table[3][(v >> 32) & 0xff] ^ erl_crc32c_table[2][(v >> 40) & 0xff] ^
              erl_crc32c_table[1][(v >> 48) & 0xff] ^ erl_crc32c_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = erl_crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t erl_crc32c_hw(uint32_t crc, const unsigned char * p, size_t n) noexcept {
    uint64_t c = ~crc;
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t) c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}
#endif

// Continue a CRC32C: pass the previous result as `crc` (0 to start).
static uint32_t erl_crc32c(uint32_t crc, const unsigned char * p, size_t n) noexcept {
#if defined(__x86_64__)
    static const bool hw = __builtin_cpu_supports("sse4.2");
    if (hw) return erl_crc32c_hw(crc, p, n);
#endif
    erl_crc32c_init();
    return erl_crc32c_sw(crc, p, n);
}
