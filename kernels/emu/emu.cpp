// The CPU emulator of the CUDA execution model (see emu.h for the model). Fibers: each thread of
// a block gets a stack of its own and starts through makecontext/setcontext; after that,
// switches between a fiber and the block's scheduler use _setjmp/_longjmp, which (unlike
// swapcontext) do not save the signal mask with a system call on every switch. The library is
// built without _FORTIFY_SOURCE, whose longjmp check refuses jumps between stacks.

#undef _FORTIFY_SOURCE
#include "emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <array>
#include <deque>
#include <exception>
#include <map>
#include <tuple>
#include <new>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#define MRT_EXPORT extern "C" __attribute__((visibility("default")))

namespace mrt_emu {

thread_local const Ids* tls_ids = nullptr;

namespace {

// ---- registry -----------------------------------------------------------------------------------

struct Kernel {
    std::string name;
    void (*fn)();
    Thunk thunk;
    const Param* params;
    int n_params;
};

std::vector<Kernel>& registry() {
    static std::vector<Kernel> r;
    return r;
}

const Kernel* find_kernel(const char* name) {
    for (const Kernel& k : registry())
        if (k.name == name) return &k;
    return nullptr;
}

// ---- float16 ------------------------------------------------------------------------------------

unsigned f32_bits(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

float bits_f32(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---- state --------------------------------------------------------------------------------------

#ifdef MOTIONRT_EMU_RACECHECK
constexpr bool kRacecheck = true;
#else
constexpr bool kRacecheck = false;
#endif

constexpr std::size_t kStack = 256 * 1024;  // per fiber; a guard page below each
constexpr std::size_t kCanary = 4096;       // poisoned bytes after the dynamic shared memory

enum class St { Ready, Blocked, Done };
enum class Wait { None, Barrier, Warp };

struct Copy {
    void* dst;
    const void* src;
    unsigned bytes;
};

struct Fiber {
    Ids ids;
    unsigned linear;
    St st;
    Wait wait;
    const char* file;
    int line;
    bool started;
    ucontext_t uc;
    jmp_buf jb;
    char* stack;
    std::vector<Copy> open;                 // issued since the last commit
    std::deque<std::vector<Copy>> groups;  // committed, oldest first
    // bank statistics: this thread's 16-byte accesses per call site since the block's last barrier
    unsigned epoch16;
    std::vector<std::pair<const char*, std::pair<int, unsigned>>> seen16;  // file, (line, count)
};

// One lane's operands and results in a warp collective.
struct Lane {
    unsigned long long v, rv;
    int arg, width;
    unsigned a[4], b[2], r[4];
    float c[4];
    const void* addr;
};

struct Warp {
    int op;
    int arrived;
    int exited;
    unsigned sync_epoch;  // __syncwarp completions in this block (race detection)
    const char* file;
    int line;
    Lane lane[32];
};

struct Block {
    const Kernel* kernel;
    void** params;
    uint3 block_idx, block_dim, grid_dim;
    std::vector<Fiber>* fibers;
    std::vector<Warp> warps;
    unsigned n;       // threads
    unsigned live;    // not exited
    unsigned at_bar;  // waiting at a barrier
    Fiber* cur;
    unsigned char* dyn;
    unsigned char* dyn_base;  // the allocation dyn is aligned within (the bytes below dyn: slack)
    jmp_buf sched;
    std::string error;
    // race detection (a library built with MOTIONRT_EMU_RACECHECK)
    bool race;
    unsigned bar_epoch;      // __syncthreads completions in this block
    unsigned block_linear;   // blockIdx as one number
    std::size_t dyn_bytes;
    std::uintptr_t tls_lo, tls_hi;  // this module's thread-local block: static __shared__ arrays
    // bounds checking (race-checking builds, when the caller gave the launch's buffers): the
    // address ranges [lo, hi) a thread may touch outside shared memory and its own stack, sorted
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> allowed;
    std::size_t n_buffers;  // the first ranges given by the caller (the rest: emulator internals)
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> buffers;  // the caller's, unsorted
    // bank statistics (mrt_emu_bank_stats): each warp's 16-byte cp.async destinations (and
    // sources, for their global sectors) and 16-byte shared loads and stores (Access16), one
    // instruction per (warp, site, kind, barrier epoch, n-th call of the site in that epoch)
    bool banks;
    std::map<std::tuple<unsigned, std::string, int, unsigned, unsigned>,
             std::array<std::pair<std::uintptr_t, std::uintptr_t>, 32>>
        acc16;
};

thread_local Block* tls_block = nullptr;

// Fiber stacks, reused by every launch on this OS thread.
struct StackPool {
    std::vector<char*> stacks;
    std::size_t guard = (std::size_t)sysconf(_SC_PAGESIZE);
    ~StackPool() {
        for (char* s : stacks) munmap(s - guard, kStack + guard);
    }
    bool ensure(std::size_t n) {
        while (stacks.size() < n) {
            void* m = mmap(nullptr, kStack + guard, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return false;
            mprotect(m, guard, PROT_NONE);
            stacks.push_back((char*)m + guard);
        }
        return true;
    }
};

thread_local StackPool tls_stacks;
thread_local std::vector<Fiber> tls_fibers;
thread_local std::vector<unsigned char> tls_dyn;

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

const char* base_name(const char* path) {
    if (!path) return "?";
    const char* s = std::strrchr(path, '/');
    return s ? s + 1 : path;
}

std::string site(const char* file, int line) { return fmt("%s:%d", base_name(file), line); }

std::string tid(const Fiber& f) {
    return fmt("(%u,%u,%u)", f.ids.thread_idx.x, f.ids.thread_idx.y, f.ids.thread_idx.z);
}

const char* op_name(int op) {
    switch (op) {
        case SHFL_XOR: return "__shfl_xor_sync";
        case SHFL_IDX: return "__shfl_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case SHFL_DOWN: return "__shfl_down_sync";
        case SYNCWARP: return "__syncwarp";
        case BALLOT: return "__ballot_sync";
        case MMA_M16N8K16: return "mma.sync.m16n8k16";
        case MMA_M16N8K8: return "mma.sync.m16n8k8";
        case LDMATRIX + 8: return "ldmatrix.x1";
        case LDMATRIX + 9: return "ldmatrix.x1.trans";
        case LDMATRIX + 16: return "ldmatrix.x2";
        case LDMATRIX + 17: return "ldmatrix.x2.trans";
        case LDMATRIX + 32: return "ldmatrix.x4";
        case LDMATRIX + 33: return "ldmatrix.x4.trans";
        default: return "a warp collective";
    }
}

Block& block() {
    if (!tls_block) {
        std::fprintf(stderr, "motionrt emulator: a device function ran outside a launch\n");
        std::abort();
    }
    return *tls_block;
}

// ---- shared-memory bank statistics --------------------------------------------------------------
// Opt-in per OS thread (mrt_emu_bank_stats), for ldmatrix, 16-byte cp.async and the 16-byte
// shared loads and stores the kernels report (shared16), whose widths the kernels fix (other
// plain loads and stores take whatever width the host compiler gives them: not counted).
// Shared memory has 32 banks of 4-byte words; a warp's request is served in phases, one per
// 8x8 matrix of an ldmatrix (the eight 16-byte rows from lanes 8i .. 8i+7) and one per quarter
// warp of a 16-byte access (lanes 8q .. 8q+7); a phase takes as many wavefronts as the largest
// number of distinct words that fall in one bank, ideally one (its 128 bytes over all 32
// banks). Banks are the address's bits 2..6: the dynamic block is 128-byte aligned, as on
// a GPU; static __shared__ arrays keep the host's alignment.

struct BankCount {
    unsigned long long requests = 0, wavefronts = 0, ideal = 0, uneven = 0;
    // cp.async: the 32-byte global sectors its sources touch, and the fewest its bytes could
    unsigned long long sectors = 0, ideal_sectors = 0;
};
thread_local bool tls_banks = false;
thread_local std::map<std::pair<std::string, std::string>, BankCount> tls_bank_sites;

// Wavefronts of one phase of `n` accesses of 16 bytes at `addr[0..n)`, and the ideal (the phase's
// distinct words over 32 banks, at least one).
std::pair<unsigned, unsigned> phase_wavefronts(const std::uintptr_t* addr, int n) {
    std::uintptr_t words[32];
    int nw = 0;
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < 4; ++k) {
            const std::uintptr_t w = addr[i] / 4 + k;
            bool seen = false;
            for (int j = 0; j < nw && !seen; ++j) seen = words[j] == w;
            if (!seen) words[nw++] = w;
        }
    unsigned per_bank[32] = {};
    unsigned most = 0;
    for (int j = 0; j < nw; ++j) most = std::max(most, ++per_bank[words[j] % 32]);
    return {std::max(most, 1u), std::max((unsigned)(nw + 31) / 32, 1u)};
}

void bank_record(const std::string& where, const char* op, unsigned wavefronts, unsigned ideal) {
    BankCount& c = tls_bank_sites[{where, op}];
    ++c.requests;
    c.wavefronts += wavefronts;
    c.ideal += ideal;
}

// The kinds of 16-byte accesses recorded per lane: cp.async, and the kernels' own 16-byte shared
// loads and stores (shared16: the engine's load16/store16 helpers).
enum Access16 : int { CP_ASYNC = 0, LD_SHARED = 1, ST_SHARED = 2 };
const char* access16_name(int kind) {
    return kind == CP_ASYNC ? "cp.async.16" : kind == LD_SHARED ? "ld.shared.16" : "st.shared.16";
}

// Record the running lane's 16-byte access of `kind` at `smem` (cp.async: from `gmem`): the
// warp's instruction is the n-th call of this site by each lane since the last barrier.
void bank_note16(Block& b, int kind, const void* smem, const void* gmem, const char* file,
                 int line) {
    Fiber& f = *b.cur;
    if (f.epoch16 != b.bar_epoch) {
        f.epoch16 = b.bar_epoch;
        f.seen16.clear();
    }
    unsigned nth = 0;
    bool found = false;
    for (auto& e : f.seen16)
        if (e.first == file && e.second.first == line) {
            nth = ++e.second.second;
            found = true;
            break;
        }
    if (!found) f.seen16.push_back({file, {line, 0u}});
    b.acc16[std::make_tuple(f.linear / 32, site(file, line), kind, b.bar_epoch, nth)]
            [f.linear % 32] = {(std::uintptr_t)smem, (std::uintptr_t)gmem};
}

// The block's 16-byte instructions, once it has run: each quarter warp's lanes a phase. Where
// the lanes of a warp called a site unequally often between two barriers, the n-th calls are
// one instruction only if the lanes with fewer calls skipped the last ones (a loop's tail), not
// calls in between (a zero-filled padding chunk): such instructions are counted, as if the
// skipped calls were the last, and also as uneven.
void bank_flush16(Block& b) {
    using Key = std::tuple<unsigned, std::string, int, unsigned, unsigned>;
    auto same_run = [](const Key& x, const Key& y) {
        return std::get<0>(x) == std::get<0>(y) && std::get<1>(x) == std::get<1>(y) &&
               std::get<2>(x) == std::get<2>(y) && std::get<3>(x) == std::get<3>(y);
    };
    for (auto it = b.acc16.begin(); it != b.acc16.end();) {
        // the calls of one site by one warp between two barriers
        auto end = it;
        unsigned calls[32] = {};
        while (end != b.acc16.end() && same_run(end->first, it->first)) {
            for (int l = 0; l < 32; ++l) calls[l] += end->second[l].first != 0;
            ++end;
        }
        const bool equal =
            std::all_of(calls, calls + 32, [&](unsigned c) { return c == calls[0]; });
        for (; it != end; ++it) {
            const int kind = std::get<2>(it->first);
            const char* op = access16_name(kind);
            if (!equal) ++tls_bank_sites[{std::get<1>(it->first), op}].uneven;
            unsigned wf = 0, ideal = 0;
            for (int q = 0; q < 4; ++q) {
                std::uintptr_t a[8];
                int n = 0;
                for (int l = 8 * q; l < 8 * q + 8; ++l)
                    if (it->second[l].first) a[n++] = it->second[l].first;
                if (!n) continue;
                const auto p = phase_wavefronts(a, n);
                wf += p.first;
                ideal += p.second;
            }
            bank_record(std::get<1>(it->first), op, wf, ideal);
            if (kind != CP_ASYNC) continue;
            // global side: the warp's distinct 32-byte sectors (a 16-byte aligned source lies in
            // one) against its bytes' fewest
            std::uintptr_t sec[32];
            int ns = 0, lanes = 0;
            for (int l = 0; l < 32; ++l) {
                if (!it->second[l].first) continue;
                ++lanes;
                const std::uintptr_t x = it->second[l].second / 32;
                if (std::find(sec, sec + ns, x) == sec + ns) sec[ns++] = x;
            }
            BankCount& c = tls_bank_sites[{std::get<1>(it->first), op}];
            c.sectors += ns;
            c.ideal_sectors += (lanes + 1) / 2;
        }
    }
    b.acc16.clear();
}

// ---- race detection -----------------------------------------------------------------------------
//
// In a library built with MOTIONRT_EMU_RACECHECK the kernel translation units are compiled with
// -fsanitize=thread but linked without ThreadSanitizer's runtime: the compiler's calls on every
// load and store (__tsan_read4, __tsan_write2, ...) land in the hooks at the end of this file,
// which check each byte against a shadow record of its last write and of its reads since:
// - shared memory (the dynamic block, and static __shared__ arrays: this module's thread-local
//   block) is tracked per block: a thread reading a byte another thread wrote, or writing a byte
//   another thread read or wrote, with no __syncthreads completed in between (and, within one
//   warp, no __syncwarp either) is a race; so is a read of a byte no thread of the block wrote;
// - global memory is tracked per launch: the same rules within a block, and any such pair of
//   accesses from two blocks (nothing orders blocks within a launch); atomics are not checked;
// - a thread's own stack (its local variables) is private and not tracked.
// ldmatrix reads each row as the lane that gave its address; cp.async writes its destination and
// reads its source when the issuing thread waits for it (when the emulator performs it). Shuffles,
// ballots and mma.sync exchange registers, not memory: only __syncwarp and __syncthreads order
// memory accesses, as in the CUDA memory model. The first race ends the launch with an error that
// names both threads and the functions (symbol + offset) of both accesses.
// Bounds: when the caller gave the launch's buffers (mrt_emu_set_bounds), a global access outside
// them, the kernel's parameters, the threads' ids and the module's constants is an error too.

struct Shadow {
    unsigned gen;    // the block's or launch's generation this record belongs to (stale: empty)
    unsigned w_tid;  // last writer's linear thread id + 1 (0: none)
    unsigned w_block, w_bar, w_wep;
    unsigned r_tid;  // last reader's linear thread id + 1 (0: none since the last write)
    unsigned r_block, r_bar, r_wep;
    unsigned r_warps;        // warps (bit per warp, mod 32) that read in (r_block, r_bar)
    unsigned char r_lanes;   // several lanes of one warp read in (r_bar, r_wep)
    unsigned char r_blocks;  // reads from several blocks (global memory)
    unsigned r_prev;  // the reader before r_tid that was another thread + 1 (0: none)
    unsigned pending;  // a cp.async in flight to this byte: its thread + 1 (0: none)
    unsigned char w_atomic;  // the last write was an atomic
    const void* w_pc;
    const void* r_pc;
    const void* r_prev_pc;
};

constexpr unsigned kShadowPage = 256;  // bytes of memory per shadow page

struct RaceState {
    std::unordered_map<std::uintptr_t, std::unique_ptr<Shadow[]>> pages;
    std::uintptr_t last_key = ~(std::uintptr_t)0;
    Shadow* last_page = nullptr;
    unsigned gen = 0;         // bumped per launch and per block
    unsigned launch_gen = 0;  // global memory records of this launch carry it
    unsigned block_gen = 0;   // shared memory records of this block carry it
    Shadow* at(std::uintptr_t a) {
        const std::uintptr_t key = a / kShadowPage;
        if (key != last_key) {
            std::unique_ptr<Shadow[]>& p = pages[key];
            if (!p) p.reset(new Shadow[kShadowPage]());
            last_key = key;
            last_page = p.get();
        }
        return &last_page[a % kShadowPage];
    }
};

thread_local RaceState tls_race;

// Buffers the next launch on this thread may touch (mrt_emu_set_bounds; empty: not checked).
thread_local std::vector<std::pair<std::uintptr_t, std::uintptr_t>> tls_bounds;

// A global access of `size` bytes at `a` outside every allowed range: the error, else empty.
std::string bounds_error(const Block& b, unsigned linear, std::uintptr_t a, std::size_t size,
                         bool write, const void* pc);

std::string where(const void* pc) {
    if (!pc) return "the emulator (cp.async, ldmatrix or an atomic)";
    Dl_info info;
    if (!dladdr(pc, &info)) return fmt("%p", pc);
    if (!info.dli_sname)  // a hidden symbol: the library and offset (kernels/src/emu.rs resolves it)
        return fmt("[%s+0x%lx]", info.dli_fname,
                   (unsigned long)((std::uintptr_t)pc - (std::uintptr_t)info.dli_fbase));
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return fmt("%s+0x%lx", name.c_str(),
               (unsigned long)((std::uintptr_t)pc - (std::uintptr_t)info.dli_saddr));
}

std::string thread_name(const Block& b, unsigned linear) {
    const unsigned x = linear % b.block_dim.x, y = (linear / b.block_dim.x) % b.block_dim.y,
                   z = linear / (b.block_dim.x * b.block_dim.y);
    return fmt("(%u,%u,%u) [warp %u]", x, y, z, linear / 32);
}

// One access of `size` bytes at `addr` by thread `linear` of the running block; an error message
// on a race (empty otherwise). `pc`: where in the kernel (null: the emulator on its behalf).
std::string race_access(Block& b, unsigned linear, const void* addr, std::size_t size, bool write,
                        const void* pc, bool atomic = false) {
    const std::uintptr_t a0 = (std::uintptr_t)addr;
    const Fiber& me = (*b.fibers)[linear];
    if (a0 >= (std::uintptr_t)me.stack && a0 < (std::uintptr_t)me.stack + kStack) return {};
    const std::uintptr_t dyn = (std::uintptr_t)b.dyn;
    const std::uintptr_t ids = (std::uintptr_t)&tls_ids;
    const bool in_dyn = a0 >= dyn && a0 < dyn + b.dyn_bytes;
    if (a0 < dyn && a0 + size > (std::uintptr_t)b.dyn_base)
        return fmt("out of bounds: thread %s %s %zu byte(s) before the start of the dynamic shared "
                   "memory in %s",
                   thread_name(b, linear).c_str(), write ? "writes" : "reads",
                   (std::size_t)(dyn - a0), where(pc).c_str());
    if (a0 + size > dyn + b.dyn_bytes && a0 < dyn + b.dyn_bytes + kCanary)
        return fmt("out of bounds: thread %s %s byte %lu of the dynamic shared memory in %s: past "
                   "the end of its %zu bytes",
                   thread_name(b, linear).c_str(), write ? "writes" : "reads",
                   (unsigned long)(std::max(a0, dyn + b.dyn_bytes) - dyn), where(pc).c_str(),
                   b.dyn_bytes);
    if (a0 >= ids && a0 < ids + sizeof tls_ids) return {};  // threadIdx & co.
    const bool in_static = a0 >= b.tls_lo && a0 < b.tls_hi;
    const bool shared = in_dyn || in_static;
    if (!shared && !b.allowed.empty()) {
        std::string e = bounds_error(b, linear, a0, size, write, pc);
        if (!e.empty()) return e;
    }
    RaceState& rs = tls_race;
    const unsigned gen = shared ? rs.block_gen : rs.launch_gen;
    const unsigned warp = linear / 32, wep = b.warps[warp].sync_epoch, blk = b.block_linear;
    const unsigned wbit = 1u << (warp % 32);
    auto what = [&](std::uintptr_t a) {
        if (in_dyn) return fmt("byte %lu of the dynamic shared memory", (unsigned long)(a - dyn));
        if (in_static) return fmt("static __shared__ byte at %p", (void*)a);
        return fmt("global memory byte at %p", (void*)a);
    };
    // ordered: a barrier completed between, or (same warp) a __syncwarp; never across blocks
    auto unordered = [&](unsigned other_tid, unsigned other_block, unsigned bar, unsigned ep) {
        if (other_block != blk) return true;
        if (bar != b.bar_epoch) return false;
        return other_tid / 32 != warp || ep == wep;
    };
    for (std::uintptr_t a = a0; a < a0 + size; ++a) {
        Shadow& s = *rs.at(a);
        if (s.gen != gen) {
            s = Shadow{};
            s.gen = gen;
        }
        if (s.pending != 0)
            return fmt("thread %s %s %s in %s while a cp.async of thread %s to it is in flight "
                       "(issued, not yet waited for)",
                       thread_name(b, linear).c_str(), write ? "writes" : "reads", what(a).c_str(),
                       where(pc).c_str(), thread_name(b, s.pending - 1).c_str());
        const bool written = s.w_tid != 0;
        const unsigned wt = s.w_tid - 1;
        if (!write) {
            if (shared && !written)
                return fmt("thread %s reads %s in %s, which no thread of this block wrote",
                           thread_name(b, linear).c_str(), what(a).c_str(), where(pc).c_str());
            if (written && (wt != linear || s.w_block != blk) &&
                unordered(wt, s.w_block, s.w_bar, s.w_wep))
                return fmt("thread %s reads %s in %s, which thread %s%s wrote in %s with no %s "
                           "between",
                           thread_name(b, linear).c_str(), what(a).c_str(), where(pc).c_str(),
                           thread_name(b, wt).c_str(),
                           s.w_block != blk ? fmt(" of block %u", s.w_block).c_str() : "",
                           where(s.w_pc).c_str(),
                           s.w_block != blk ? "ordering (another block, same launch)"
                           : wt / 32 == warp ? "__syncwarp or __syncthreads"
                                             : "__syncthreads");
            // the reads since the last write
            if (s.r_tid != 0 && (s.r_block != blk || s.r_bar != b.bar_epoch)) {
                if (s.r_block != blk) s.r_blocks = 1;
                s.r_warps = 0;
                s.r_lanes = 0;
                s.r_tid = 0;
                s.r_prev = 0;
            }
            if (s.r_tid == 0) {
                s.r_warps = wbit;
                s.r_lanes = 0;
                s.r_prev = 0;
            } else {
                if (s.r_warps == wbit && s.r_wep != wep) {
                    // the earlier reads of this warp precede a __syncwarp: ordered, forgotten
                    s.r_lanes = 0;
                    s.r_prev = 0;
                } else if (s.r_tid - 1 != linear) {
                    s.r_lanes = 1;
                    s.r_prev = s.r_tid;
                    s.r_prev_pc = s.r_pc;
                }
                s.r_warps |= wbit;
            }
            s.r_tid = linear + 1;
            s.r_block = blk;
            s.r_bar = b.bar_epoch;
            s.r_wep = wep;
            s.r_pc = pc;
            continue;
        }
        if (written && (wt != linear || s.w_block != blk) && !(atomic && s.w_atomic) &&
            unordered(wt, s.w_block, s.w_bar, s.w_wep))
            return fmt("threads %s and %s%s both write %s (in %s and %s) with no %s between",
                       thread_name(b, wt).c_str(), thread_name(b, linear).c_str(),
                       s.w_block != blk ? fmt(" (blocks %u and %u)", s.w_block, blk).c_str() : "",
                       what(a).c_str(), where(s.w_pc).c_str(), where(pc).c_str(),
                       s.w_block != blk ? "ordering"
                       : wt / 32 == warp ? "__syncwarp or __syncthreads"
                                         : "__syncthreads");
        if (s.r_tid != 0) {
            // name a reader other than this thread where there is one
            const bool prev = s.r_tid - 1 == linear && s.r_prev != 0;
            const unsigned rt = prev ? s.r_prev - 1 : s.r_tid - 1;
            const void* rpc = prev ? s.r_prev_pc : s.r_pc;
            bool race = s.r_blocks || s.r_block != blk;
            if (!race && s.r_bar == b.bar_epoch) {
                if (s.r_warps & ~wbit)
                    race = true;  // a reader in another warp
                else if (s.r_wep == wep && (s.r_lanes || rt != linear))
                    race = true;  // another lane of this warp, no __syncwarp since
            }
            if (race)
                return fmt("thread %s writes %s in %s, which thread %s%s read in %s with no %s "
                           "between",
                           thread_name(b, linear).c_str(), what(a).c_str(), where(pc).c_str(),
                           thread_name(b, rt).c_str(),
                           s.r_block != blk ? fmt(" of block %u", s.r_block).c_str() : "",
                           where(rpc).c_str(),
                           s.r_block != blk || s.r_blocks ? "ordering (another block)"
                           : rt / 32 == warp              ? "__syncwarp or __syncthreads"
                                                          : "__syncthreads");
        }
        s.w_tid = linear + 1;
        s.w_block = blk;
        s.w_bar = b.bar_epoch;
        s.w_wep = wep;
        s.w_pc = pc;
        s.w_atomic = atomic;
        s.r_tid = 0;
        s.r_prev = 0;
        s.r_warps = 0;
        s.r_lanes = 0;
        s.r_blocks = 0;
    }
    return {};
}

struct Module {
    std::uintptr_t tls_lo = 0, tls_hi = 0;  // this thread's instance of the module's TLS block
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> loads;  // its mapped segments
};

// A cp.async of `size` bytes to `dst` issued by thread `linear`: checked as its write now (the
// copy may land at once), then marked in flight, so that any access to those bytes before the
// issuing thread waits for it is an error.
std::string cp_async_issued(Block& b, unsigned linear, void* dst, std::size_t size) {
    std::string e = race_access(b, linear, dst, size, true, nullptr);
    if (!e.empty()) return e;
    const std::uintptr_t a0 = (std::uintptr_t)dst;
    for (std::uintptr_t a = a0; a < a0 + size; ++a) tls_race.at(a)->pending = linear + 1;
    return {};
}

// The copy landed (the issuing thread waited for it): no longer in flight.
void cp_async_landed(void* dst, std::size_t size) {
    const std::uintptr_t a0 = (std::uintptr_t)dst;
    for (std::uintptr_t a = a0; a < a0 + size; ++a) tls_race.at(a)->pending = 0;
}

// This module's thread-local block in the calling thread (where static __shared__ arrays live)
// and its segments (constants and static data the kernels may read).
int find_module(struct dl_phdr_info* info, std::size_t, void* data) {
    const std::uintptr_t me = (std::uintptr_t)&find_module;
    bool mine = false;
    std::size_t tls = 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        const std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && me >= lo && me < lo + ph.p_memsz) mine = true;
        if (ph.p_type == PT_TLS) tls = ph.p_memsz;
    }
    if (!mine) return 0;
    auto* m = (Module*)data;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        const std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD) m->loads.push_back({lo, lo + ph.p_memsz});
    }
    if (info->dlpi_tls_data) {
        m->tls_lo = (std::uintptr_t)info->dlpi_tls_data;
        m->tls_hi = m->tls_lo + tls;
    }
    return 1;
}

std::string bounds_error(const Block& b, unsigned linear, std::uintptr_t a, std::size_t size,
                         bool write, const void* pc) {
    // the last range starting at or below a
    auto it = std::upper_bound(
        b.allowed.begin(), b.allowed.end(), a,
        [](std::uintptr_t x, const std::pair<std::uintptr_t, std::uintptr_t>& r) {
            return x < r.first;
        });
    if (it != b.allowed.begin() && a + size <= std::prev(it)->second) return {};
    // name the nearest of the caller's buffers
    std::string near;
    std::uintptr_t best = ~(std::uintptr_t)0;
    for (std::size_t i = 0; i < b.buffers.size(); ++i) {
        const auto& r = b.buffers[i];
        const std::uintptr_t d = a >= r.second ? a - r.second + 1 : r.first > a ? r.first - a : 0;
        if (d < best) {
            best = d;
            near = a >= r.first && a < r.second
                       ? fmt("the last %zu byte(s) past the end of buffer %zu (%zu bytes)",
                             (std::size_t)(a + size - r.second), i,
                             (std::size_t)(r.second - r.first))
                   : a >= r.second
                       ? fmt("%zu byte(s) past the end of buffer %zu (%zu bytes)",
                             (std::size_t)(a - r.second), i, (std::size_t)(r.second - r.first))
                       : fmt("%zu byte(s) before buffer %zu", (std::size_t)(r.first - a), i);
        }
    }
    return fmt("out of bounds: thread %s %s %zu byte(s) at %p in %s, outside every buffer of "
               "the launch%s%s",
               thread_name(b, linear).c_str(), write ? "writes" : "reads", size, (void*)a,
               where(pc).c_str(), near.empty() ? "" : ": ", near.c_str());
}

// A hook's access by the running thread (a race ends the launch).
void race_hook(const void* addr, std::size_t size, bool write, const void* pc);

// ---- switching ----------------------------------------------------------------------------------

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
    Block& b = block();
    if (_setjmp(b.cur->jb) == 0) _longjmp(b.sched, 1);
}

// End the launch with `msg` (about the running thread); never returns.
[[noreturn]] void fail(const std::string& msg) {
    Block& b = block();
    if (b.error.empty()) b.error = "thread " + tid(*b.cur) + ": " + msg;
    b.cur->st = St::Done;  // never resumed
    _longjmp(b.sched, 1);
}

void race_hook(const void* addr, std::size_t size, bool write, const void* pc) {
    Block* b = tls_block;
    if (!b || !b->race || !b->cur) return;
    std::string e = race_access(*b, b->cur->linear, addr, size, write, pc);
    if (!e.empty()) fail(e.rfind("out of bounds", 0) == 0 ? e : "race: " + e);
}

// An atomic read-modify-write by the running thread: a write that does not race with other
// atomics, but does with plain accesses of other threads in the same interval; a later read is
// not of unwritten memory.
void race_atomic_rmw(const void* p, std::size_t size) {
    Block* b = tls_block;
    if (!b || !b->race || !b->cur) return;
    const std::string e = race_access(*b, b->cur->linear, p, size, true, nullptr, true);
    if (!e.empty()) fail("race (atomic): " + e);
}

// The copies land: as the issuing (running) thread's reads of the source and writes of the
// destination for race detection; a race is left in the block's error.
void perform(std::vector<Copy>& copies) {
    Block& b = block();
    for (const Copy& c : copies) {
        if (b.race && b.error.empty()) {
            cp_async_landed(c.dst, c.bytes);
            const std::string e = race_access(b, b.cur->linear, c.dst, c.bytes, true, nullptr);
            if (!e.empty()) b.error = "thread " + tid(*b.cur) + ": race (cp.async): " + e;
        }
        std::memcpy(c.dst, c.src, c.bytes);
    }
    copies.clear();
}

// Release the barrier if every live thread waits at it, all at the same call site.
void check_barrier(Block& b) {
    if (b.at_bar == 0 || b.at_bar < b.live) return;
    std::vector<Fiber>& fs = *b.fibers;
    const Fiber* first = nullptr;
    for (unsigned i = 0; i < b.n; ++i) {
        const Fiber& f = fs[i];
        if (f.st != St::Blocked || f.wait != Wait::Barrier) continue;
        if (!first) {
            first = &f;
        } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
            // a barrier that can never complete: reported by the scheduler as a deadlock
            return;
        }
    }
    for (unsigned i = 0; i < b.n; ++i) {
        Fiber& f = fs[i];
        if (f.st == St::Blocked && f.wait == Wait::Barrier) {
            f.st = St::Ready;
            f.wait = Wait::None;
        }
    }
    b.at_bar = 0;
    ++b.bar_epoch;
}

void fiber_exit(Block& b, Fiber& f) {
    f.groups.push_back(std::move(f.open));
    f.open.clear();
    for (auto& g : f.groups) perform(g);  // the copies land eventually
    f.groups.clear();
    f.st = St::Done;
    --b.live;
    Warp& w = b.warps[f.linear / 32];
    ++w.exited;
    if (w.arrived > 0 && b.error.empty()) {
        b.error = fmt("thread %s exited while %d lane(s) of its warp %u wait in %s (%s): a "
                      "full-mask warp collective can never complete",
                      tid(f).c_str(), w.arrived, f.linear / 32, op_name(w.op),
                      site(w.file, w.line).c_str());
    }
    check_barrier(b);
}

void fiber_main() {
    Block& b = block();
    b.kernel->thunk(b.kernel->fn, b.params);
    Block& b2 = block();  // the same block; re-read after the kernel's switches
    fiber_exit(b2, *b2.cur);
    _longjmp(b2.sched, 1);
}

std::string describe_deadlock(Block& b) {
    std::vector<Fiber>& fs = *b.fibers;
    std::vector<std::string> parts;
    // group the waiting threads by where they wait
    std::vector<bool> seen(b.n, false);
    for (unsigned i = 0; i < b.n; ++i) {
        const Fiber& f = fs[i];
        if (seen[i] || f.st != St::Blocked) continue;
        unsigned count = 0;
        for (unsigned j = i; j < b.n; ++j) {
            const Fiber& g = fs[j];
            if (g.st == St::Blocked && g.wait == f.wait && g.line == f.line &&
                std::strcmp(g.file, f.file) == 0 &&
                (f.wait == Wait::Barrier || g.linear / 32 == f.linear / 32)) {
                seen[j] = true;
                ++count;
            }
        }
        if (f.wait == Wait::Barrier) {
            parts.push_back(fmt("%u thread(s) from %s wait at __syncthreads (%s)", count,
                                tid(f).c_str(), site(f.file, f.line).c_str()));
        } else {
            const Warp& w = b.warps[f.linear / 32];
            parts.push_back(fmt("%u lane(s) of warp %u from thread %s wait in %s (%s), %d of 32 "
                                "arrived",
                                count, f.linear / 32, tid(f).c_str(), op_name(w.op),
                                site(f.file, f.line).c_str(), w.arrived));
        }
    }
    const unsigned done = b.n - b.live;
    if (done) parts.push_back(fmt("%u thread(s) have exited", done));
    std::string msg = "deadlock: no thread can proceed";
    for (std::size_t i = 0; i < parts.size(); ++i) msg += (i ? "; " : ": ") + parts[i];
    return msg;
}

void run_block(Block& b) {
    std::vector<Fiber>& fs = *b.fibers;
    for (unsigned i = 0; i < b.n; ++i) {
        Fiber& f = fs[i];
        f.linear = i;
        f.ids.thread_idx = {i % b.block_dim.x, (i / b.block_dim.x) % b.block_dim.y,
                            i / (b.block_dim.x * b.block_dim.y)};
        f.ids.block_idx = b.block_idx;
        f.ids.block_dim = b.block_dim;
        f.ids.grid_dim = b.grid_dim;
        f.st = St::Ready;
        f.wait = Wait::None;
        f.file = "";
        f.line = 0;
        f.started = false;
        f.open.clear();
        f.groups.clear();
        f.epoch16 = ~0u;
        f.seen16.clear();
    }
    b.bar_epoch = 0;
    b.block_linear = b.block_idx.x + b.grid_dim.x * (b.block_idx.y + b.grid_dim.y * b.block_idx.z);
    if (b.race) tls_race.block_gen = ++tls_race.gen;
    for (Warp& w : b.warps) {
        w.sync_epoch = 0;
        w.op = 0;
        w.arrived = 0;
        w.exited = 0;
        w.file = "";
        w.line = 0;
    }
    b.live = b.n;
    b.at_bar = 0;
    unsigned next = 0;
    while (b.error.empty()) {
        Fiber* f = nullptr;
        for (unsigned k = 0; k < b.n; ++k) {
            Fiber& c = fs[(next + k) % b.n];
            if (c.st == St::Ready) {
                f = &c;
                break;
            }
        }
        if (!f) {
            if (b.live > 0) b.error = describe_deadlock(b);
            break;
        }
        next = (f->linear + 1) % b.n;
        b.cur = f;
        tls_ids = &f->ids;
        if (_setjmp(b.sched) == 0) {
            if (!f->started) {
                f->started = true;
                getcontext(&f->uc);
                f->uc.uc_stack.ss_sp = f->stack;
                f->uc.uc_stack.ss_size = kStack;
                f->uc.uc_link = nullptr;
                makecontext(&f->uc, fiber_main, 0);
                setcontext(&f->uc);
            } else {
                _longjmp(f->jb, 1);
            }
        }
        tls_ids = nullptr;
    }
}

// ---- warp collectives ---------------------------------------------------------------------------

// mma.sync and ldmatrix carry .aligned in the PTX ISA: all lanes execute the same instruction.
bool is_aligned(int op) { return op == MMA_M16N8K16 || op == MMA_M16N8K8 || op >= LDMATRIX; }

// Deposit point of the running lane in its warp's collective `op`.
Lane& arrive(int op, unsigned mask, const char* file, int line) {
    Block& b = block();
    Fiber& f = *b.cur;
    Warp& w = b.warps[f.linear / 32];
    if (mask != 0xffffffffu)
        fail(fmt("%s (%s) with mask 0x%08x: the emulator supports full-warp masks only",
                 op_name(op), site(file, line).c_str(), mask));
    if (w.exited)
        fail(fmt("%s (%s) in warp %u, %d lane(s) of which have exited: a full-mask collective can "
                 "never complete",
                 op_name(op), site(file, line).c_str(), f.linear / 32, w.exited));
    if (w.arrived == 0) {
        w.op = op;
        w.file = file;
        w.line = line;
    } else if (w.op != op) {
        fail(fmt("reached %s (%s) while other lanes of warp %u wait in %s (%s)", op_name(op),
                 site(file, line).c_str(), f.linear / 32, op_name(w.op),
                 site(w.file, w.line).c_str()));
    } else if (is_aligned(op) && (w.line != line || std::strcmp(w.file, file) != 0)) {
        // mma.sync and ldmatrix are .aligned: every lane must execute the same instruction
        // (the shuffles, __syncwarp and ballot may meet from different places)
        fail(fmt("reached %s (%s) while other lanes of warp %u wait in it at %s: the PTX ISA "
                 "requires all lanes to execute the same .aligned instruction",
                 op_name(op), site(file, line).c_str(), f.linear / 32,
                 site(w.file, w.line).c_str()));
    }
    return w.lane[f.linear % 32];
}

std::uint16_t load_b16(const void* row, int col) {
    std::uint16_t v;
    std::memcpy(&v, (const char*)row + 2 * col, 2);
    return v;
}

void complete(Block& b, Warp& w, unsigned warp) {
    Lane* L = w.lane;
    const int op = w.op;
    if (op >= SHFL_XOR && op <= SHFL_DOWN) {
        for (int l = 0; l < 32; ++l) {
            const int width = L[l].width;
            const int seg = l & ~(width - 1);  // first lane of this lane's segment
            int src = l;
            switch (op) {
                case SHFL_XOR: {
                    const int s = l ^ L[l].arg;
                    src = s < seg + width ? s : l;  // later segments: own value
                    break;
                }
                case SHFL_IDX: src = seg + (L[l].arg & (width - 1)); break;
                case SHFL_UP: src = l - L[l].arg >= seg ? l - L[l].arg : l; break;
                case SHFL_DOWN: src = l + L[l].arg < seg + width ? l + L[l].arg : l; break;
            }
            L[l].rv = L[src & 31].v;
        }
    } else if (op == BALLOT) {
        unsigned bits = 0;
        for (int l = 0; l < 32; ++l)
            if (L[l].v) bits |= 1u << l;
        for (int l = 0; l < 32; ++l) L[l].rv = bits;
    } else if (op == MMA_M16N8K16 || op == MMA_M16N8K8) {
        // Fragment layouts of mma.m16n8k16 with .f16 multiplicands and .f32 accumulators (PTX
        // ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"): groupID = lane >> 2,
        // threadID_in_group = lane % 4; A elements a0..a7 (two per register, lower index in the
        // low half): row = groupID for a0, a1, a4, a5 and groupID + 8 otherwise, col = 2 *
        // threadID_in_group + (i & 1), + 8 for i >= 4; B b0..b3: row = 2 * threadID_in_group +
        // (i & 1), + 8 for i >= 2, col = groupID; C/D c0..c3: row = groupID for c0, c1 and
        // groupID + 8 for c2, c3, col = 2 * threadID_in_group + (i & 1).
        // mma.m16n8k8 ("Matrix Fragments for mma.m16n8k8", .f16): A a0..a3 in two registers,
        // row = groupID for a0, a1 and groupID + 8 for a2, a3, col = 2 * threadID_in_group +
        // (i & 1); B b0, b1 in one register, row = 2 * threadID_in_group + i, col = groupID; C/D
        // as above. Here: the k16 product with k 8..15 zero.
        const int K = op == MMA_M16N8K8 ? 8 : 16;
        float A[16][16] = {}, B[16][8] = {}, C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int r = 0; r < K / 4; ++r) {
                const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
                A[row][col] = h2f((std::uint16_t)(L[l].a[r] & 0xffff));
                A[row][col + 1] = h2f((std::uint16_t)(L[l].a[r] >> 16));
            }
            for (int r = 0; r < K / 8; ++r) {
                const int row = 2 * t + 8 * r;
                B[row][g] = h2f((std::uint16_t)(L[l].b[r] & 0xffff));
                B[row + 1][g] = h2f((std::uint16_t)(L[l].b[r] >> 16));
            }
            C[g][2 * t] = L[l].c[0];
            C[g][2 * t + 1] = L[l].c[1];
            C[g + 8][2 * t] = L[l].c[2];
            C[g + 8][2 * t + 1] = L[l].c[3];
        }
        float D[16][8];
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                // products of f16 values are exact in f32; the sum is accumulated in f32
                float s = 0.f;
                for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
                D[i][j] = C[i][j] + s;
            }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            L[l].c[0] = D[g][2 * t];
            L[l].c[1] = D[g][2 * t + 1];
            L[l].c[2] = D[g + 8][2 * t];
            L[l].c[3] = D[g + 8][2 * t + 1];
        }
    } else if (op >= LDMATRIX + 8) {
        // ldmatrix .m8n8 .b16 (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): the
        // row addresses of matrix i come from lanes 8i .. 8i+7 (16 contiguous bytes each);
        // each lane receives fragments of a row, four consecutive lanes one whole row: lane l's
        // register i holds row l >> 2, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (lower
        // column in the low half). .trans loads the matrix in column-major order, i.e. lane l
        // gets elements (row 2 (l % 4), col l >> 2) and (row 2 (l % 4) + 1, col l >> 2).
        const int num = (op - LDMATRIX) / 8;
        const bool trans = (op - LDMATRIX) & 1;
        for (int l = 0; l < 8 * num; ++l) {
            if ((std::uintptr_t)L[l].addr % 16 != 0) {
                b.error = fmt("%s (%s) in warp %u: lane %d's row address %p is not 16-byte "
                              "aligned",
                              op_name(op), site(w.file, w.line).c_str(), warp, l, L[l].addr);
                return;
            }
            if (b.race) {
                const std::string e = race_access(b, warp * 32 + l, L[l].addr, 16, false, nullptr);
                if (!e.empty()) {
                    b.error = fmt("race (%s, %s): ", op_name(op), site(w.file, w.line).c_str()) + e;
                    return;
                }
            }
        }
        if (b.banks) {
            unsigned wf = 0, ideal = 0;
            for (int i = 0; i < num; ++i) {
                std::uintptr_t a[8];
                for (int r = 0; r < 8; ++r) a[r] = (std::uintptr_t)L[8 * i + r].addr;
                const auto p = phase_wavefronts(a, 8);
                wf += p.first;
                ideal += p.second;
            }
            bank_record(site(w.file, w.line), op_name(op), wf, ideal);
        }
        for (int l = 0; l < 32; ++l) {
            for (int i = 0; i < num; ++i) {
                std::uint16_t lo, hi;
                if (!trans) {
                    const void* row = L[8 * i + (l >> 2)].addr;
                    lo = load_b16(row, 2 * (l & 3));
                    hi = load_b16(row, 2 * (l & 3) + 1);
                } else {
                    lo = load_b16(L[8 * i + 2 * (l & 3)].addr, l >> 2);
                    hi = load_b16(L[8 * i + 2 * (l & 3) + 1].addr, l >> 2);
                }
                L[l].r[i] = (unsigned)lo | ((unsigned)hi << 16);
            }
        }
    }
    if (op == SYNCWARP) ++w.sync_epoch;  // orders the lanes' memory accesses
}

// The running lane has deposited its operands: complete the collective or wait for the others.
// One rendezvous suffices: a lane writes only its own slot, results go to its own slot too, and
// the next completion needs every lane to have arrived again, i.e. to have read its result.
void rendezvous(const char* file, int line) {
    Block& b = block();
    Fiber& f = *b.cur;
    const unsigned warp = f.linear / 32;
    Warp& w = b.warps[warp];
    if (++w.arrived < 32) {
        f.st = St::Blocked;
        f.wait = Wait::Warp;
        f.file = file;
        f.line = line;
        yield();
        return;
    }
    complete(b, w, warp);
    if (!b.error.empty()) fail(b.error);
    w.arrived = 0;
    std::vector<Fiber>& fs = *b.fibers;
    for (unsigned l = 0; l < 32; ++l) {
        Fiber& g = fs[warp * 32 + l];
        if (g.st == St::Blocked && g.wait == Wait::Warp) {
            g.st = St::Ready;
            g.wait = Wait::None;
        }
    }
}

}  // namespace

// ---- the device API (emu.h) ---------------------------------------------------------------------

void syncthreads(const char* file, int line) {
    Block& b = block();
    Fiber& f = *b.cur;
    f.st = St::Blocked;
    f.wait = Wait::Barrier;
    f.file = file;
    f.line = line;
    ++b.at_bar;
    check_barrier(b);
    yield();
}

unsigned long long shuffle(int op, unsigned mask, unsigned long long bits, int arg, int width,
                           const char* file, int line) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail(fmt("%s (%s): width %d is not a power of two in 1..32", op_name(op),
                 site(file, line).c_str(), width));
    Lane& l = arrive(op, mask, file, line);
    l.v = bits;
    l.arg = arg;
    l.width = width;
    rendezvous(file, line);
    return l.rv;
}

void syncwarp(unsigned mask, const char* file, int line) {
    arrive(SYNCWARP, mask, file, line);
    rendezvous(file, line);
}

unsigned ballot(unsigned mask, int predicate, const char* file, int line) {
    Lane& l = arrive(BALLOT, mask, file, line);
    l.v = predicate != 0;
    rendezvous(file, line);
    return (unsigned)l.rv;
}

void mma_m16n8k16(float* c, const unsigned* a, unsigned b0, unsigned b1, const char* file,
                  int line) {
    Lane& l = arrive(MMA_M16N8K16, 0xffffffffu, file, line);
    for (int i = 0; i < 4; ++i) {
        l.a[i] = a[i];
        l.c[i] = c[i];
    }
    l.b[0] = b0;
    l.b[1] = b1;
    rendezvous(file, line);
    for (int i = 0; i < 4; ++i) c[i] = l.c[i];
}

void mma_m16n8k8(float* c, const unsigned* a, unsigned b0, const char* file, int line) {
    Lane& l = arrive(MMA_M16N8K8, 0xffffffffu, file, line);
    for (int i = 0; i < 4; ++i) {
        l.a[i] = i < 2 ? a[i] : 0u;
        l.c[i] = c[i];
    }
    l.b[0] = b0;
    l.b[1] = 0u;
    rendezvous(file, line);
    for (int i = 0; i < 4; ++i) c[i] = l.c[i];
}

void ldmatrix(int num, bool trans, unsigned* r, const void* row, const char* file, int line) {
    Lane& l = arrive(LDMATRIX + 8 * num + (trans ? 1 : 0), 0xffffffffu, file, line);
    l.addr = row;
    rendezvous(file, line);
    for (int i = 0; i < num; ++i) r[i] = l.r[i];
}

void cp_async(void* smem, const void* gmem, unsigned bytes, const char* file, int line) {
    if ((std::uintptr_t)smem % bytes != 0 || (std::uintptr_t)gmem % bytes != 0)
        fail(fmt("cp.async (%s) of %u bytes from %p to %p: both addresses must be %u-byte "
                 "aligned",
                 site(file, line).c_str(), bytes, gmem, smem, bytes));
    Block& b = block();
    if (b.race) {
        // the source is read and the destination may be written from now until the wait
        std::string e = race_access(b, b.cur->linear, gmem, bytes, false, nullptr);
        if (e.empty()) e = cp_async_issued(b, b.cur->linear, smem, bytes);
        if (!e.empty()) fail("race (cp.async, " + site(file, line) + "): " + e);
    }
    if (b.banks && bytes == 16) bank_note16(b, CP_ASYNC, smem, gmem, file, line);
    b.cur->open.push_back({smem, gmem, bytes});
}

void cp_async_commit() {
    Fiber& f = *block().cur;
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}

void cp_async_wait(int pending) {
    Fiber& f = *block().cur;
    while (f.groups.size() > (std::size_t)(pending < 0 ? 0 : pending)) {
        perform(f.groups.front());
        f.groups.pop_front();
    }
    if (!block().error.empty()) fail(block().error);
}

void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait(0);
}

void* dynamic_shared() { return block().dyn; }

void shared16(const void* p, bool write, const char* file, int line) {
    // a 16-byte access (LDG/STG/LDS/STS .128) at an address not a multiple of 16 faults on a
    // GPU ("misaligned address"), global or shared; the host would run it
    if ((std::uintptr_t)p % 16 != 0)
        fail(fmt("a 16-byte %s (%s) at %p: the address must be 16-byte aligned (a GPU faults)",
                 write ? "store" : "load", site(file, line).c_str(), p));
    Block& b = block();
    const unsigned char* a = (const unsigned char*)p;
    if (!b.banks || a < b.dyn || a >= b.dyn + b.dyn_bytes) return;
    bank_note16(b, write ? ST_SHARED : LD_SHARED, p, nullptr, file, line);
}

void atomic_rmw(const void* p, std::size_t size) { race_atomic_rmw(p, size); }

float h2f(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000) << 16;
    const unsigned e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));  // inf, NaN (payload kept)
    if (e != 0) return bits_f32(sign | ((e + 112) << 23) | (m << 13));
    if (m == 0) return bits_f32(sign);
    // subnormal: m * 2^-24, exact in f32
    const float v = (float)m * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

unsigned short f2h(float f) {
    const unsigned x = f32_bits(f);
    const unsigned short sign = (unsigned short)((x >> 16) & 0x8000);
    const unsigned ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;                    // NaN: the canonical f16 NaN
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00);  // >= 65520 rounds to inf
    const unsigned e = ax >> 23, mant = ax & 0x7fffff;
    if (e < 113) {
        // below 2^-14: an f16 subnormal, in units of 2^-24 = m32 * 2^(e - 150 + 24)
        if (e < 101) return sign;  // below 2^-25 (half the smallest subnormal): zero
        const unsigned m32 = mant | 0x800000;
        const unsigned shift = 126 - e;  // 14 ..25
        unsigned q = m32 >> shift;
        const unsigned rem = m32 & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) ++q;
        return (unsigned short)(sign | q);
    }
    unsigned q = ((e - 112) << 10) | (mant >> 13);
    const unsigned rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) ++q;  // a carry moves into the exponent
    return (unsigned short)(sign | q);
}

void register_kernel(const char* name, void (*fn)(), Thunk thunk, const Param* params, int n) {
    registry().push_back({name, fn, thunk, params, n});
}

}  // namespace mrt_emu

// ---- C ABI (kernels/src/emu.rs) -----------------------------------------------------------------

using namespace mrt_emu;

MRT_EXPORT int mrt_emu_kernel_count(void) { return (int)registry().size(); }

MRT_EXPORT const char* mrt_emu_kernel_name(int i) {
    return i >= 0 && (std::size_t)i < registry().size() ? registry()[i].name.c_str() : nullptr;
}

// The kernel's parameter count (or -1 if unknown); the first `max` kinds and sizes are written.
MRT_EXPORT int mrt_emu_kernel_params(const char* kernel, char* kinds, std::size_t* sizes, int max) {
    const Kernel* k = find_kernel(kernel);
    if (!k) return -1;
    for (int i = 0; i < k->n_params && i < max; ++i) {
        kinds[i] = k->params[i].kind;
        sizes[i] = k->params[i].size;
    }
    return k->n_params;
}

// The buffers (`n` [lo, hi) address pairs) the next launches on this thread may touch: in a
// race-checking library, a kernel's access to global memory outside them (and outside its
// parameters and the module's constants) ends the launch with an error. n = 0: not checked.
MRT_EXPORT void mrt_emu_set_bounds(const unsigned long long* ranges, std::size_t n) {
    tls_bounds.clear();
    for (std::size_t i = 0; i < n; ++i)
        tls_bounds.push_back({(std::uintptr_t)ranges[2 * i], (std::uintptr_t)ranges[2 * i + 1]});
}

// Shared-memory bank statistics of ldmatrix and 16-byte cp.async (see "shared-memory bank
// statistics") for the next launches on this thread: on (non-zero) or off; either way the counts
// so far are cleared.
MRT_EXPORT void mrt_emu_bank_stats(int on) {
    tls_banks = on != 0;
    tls_bank_sites.clear();
}

// The counts since mrt_emu_bank_stats, one line per call site and instruction: "site\top\t
// requests\twavefronts\tideal\tuneven\tsectors\tideal_sectors\n" (requests: warp instructions;
// ideal: the wavefronts without bank conflicts; uneven: 16-byte instructions grouped on an
// assumption, see bank_flush16; sectors: the 32-byte global sectors cp.async read, and the
// fewest its bytes could take). Writes at most `len` bytes (NUL-terminated) and returns the
// length of the whole report, so a caller whose buffer was too small can ask again.
MRT_EXPORT std::size_t mrt_emu_bank_report(char* buf, std::size_t len) {
    std::string r;
    for (const auto& e : tls_bank_sites)
        r += fmt("%s\t%s\t%llu\t%llu\t%llu\t%llu\t%llu\t%llu\n", e.first.first.c_str(),
                 e.first.second.c_str(), e.second.requests, e.second.wavefronts, e.second.ideal,
                 e.second.uneven, e.second.sectors, e.second.ideal_sectors);
    if (buf && len) std::snprintf(buf, len, "%s", r.c_str());
    return r.size();
}

// Run `kernel` over the grid like cuLaunchKernel: params[i] points at the i-th argument's value
// (pointer arguments are host addresses). Returns 0, or non-zero with a message in err.
MRT_EXPORT int mrt_emu_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz,
                              unsigned bx, unsigned by, unsigned bz, std::size_t dyn_smem_bytes,
                              void** params, char* err, std::size_t err_len) {
    std::string error;
    auto report = [&](const std::string& m) {
        if (err && err_len) {
            std::snprintf(err, err_len, "%s", m.c_str());
        }
        return 1;
    };
    const Kernel* k = find_kernel(kernel ? kernel : "");
    if (!k)
        return report(fmt("unknown kernel \"%s\" (%zu kernels are registered)", kernel,
                          registry().size()));
    const std::string who = fmt("kernel %s", kernel);
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (threads == 0 || threads > 1024 || threads % 32 != 0 || bz > 64)
        return report(fmt("%s: block (%u,%u,%u) has %llu threads; the emulator needs a positive "
                          "multiple of 32, at most 1024 (and blockDim.z <= 64)",
                          who.c_str(), bx, by, bz, threads));
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535)
        return report(fmt("%s: grid (%u,%u,%u) is empty or beyond CUDA's limits", who.c_str(), gx,
                          gy, gz));
    if (dyn_smem_bytes > 227 * 1024)
        return report(fmt("%s: %zu bytes of dynamic shared memory; no GPU offers more than 227 KiB "
                          "per block",
                          who.c_str(), dyn_smem_bytes));
    if (tls_block)
        return report(who + ": launched from a kernel (dynamic parallelism is not emulated)");
    try {
        if (!tls_stacks.ensure(threads)) return report(who + ": cannot map fiber stacks");
        if (tls_fibers.size() < threads) tls_fibers.resize(threads);
        for (unsigned i = 0; i < threads; ++i) tls_fibers[i].stack = tls_stacks.stacks[i];
        const std::size_t dyn_alloc = dyn_smem_bytes + kCanary + 128;
        if (tls_dyn.size() < dyn_alloc) tls_dyn.resize(dyn_alloc);
        unsigned char* dyn = tls_dyn.data();
        // 128-byte aligned, at least 16 bytes in (malloc's alignment): a small underflow lands in
        // the slack below, which race-checking builds report
        dyn += 128 - (std::uintptr_t)dyn % 128;

        Block b;
        b.kernel = k;
        b.params = params;
        b.block_dim = {bx, by, bz};
        b.grid_dim = {gx, gy, gz};
        b.fibers = &tls_fibers;
        b.warps.resize(threads / 32);
        b.n = (unsigned)threads;
        b.cur = nullptr;
        b.dyn = dyn;
        b.dyn_base = tls_dyn.data();
        b.dyn_bytes = dyn_smem_bytes;
        b.race = kRacecheck;
        b.banks = tls_banks;
        b.tls_lo = b.tls_hi = 0;
        b.allowed.clear();
        b.buffers.clear();
        if (b.race) {
            Module m;
            dl_iterate_phdr(find_module, &m);
            b.tls_lo = m.tls_lo;
            b.tls_hi = m.tls_hi;
            if (!tls_bounds.empty()) {
                // the caller's buffers, and what the kernels read besides: their parameters,
                // the threads' ids (threadIdx & co.), the module's constants
                b.buffers = tls_bounds;
                b.allowed = tls_bounds;
                b.allowed.push_back({(std::uintptr_t)params,
                                     (std::uintptr_t)(params + k->n_params)});
                for (int i = 0; i < k->n_params; ++i)
                    b.allowed.push_back({(std::uintptr_t)params[i],
                                         (std::uintptr_t)params[i] + k->params[i].size});
                b.allowed.push_back({(std::uintptr_t)tls_fibers.data(),
                                     (std::uintptr_t)(tls_fibers.data() + tls_fibers.size())});
                b.allowed.insert(b.allowed.end(), m.loads.begin(), m.loads.end());
                std::sort(b.allowed.begin(), b.allowed.end());
                // merge overlaps, so that the lookup's one candidate decides
                std::vector<std::pair<std::uintptr_t, std::uintptr_t>> merged;
                for (const auto& r : b.allowed) {
                    if (!merged.empty() && r.first <= merged.back().second)
                        merged.back().second = std::max(merged.back().second, r.second);
                    else
                        merged.push_back(r);
                }
                b.allowed.swap(merged);
            }
            tls_race.pages.clear();
            tls_race.last_key = ~(std::uintptr_t)0;
            tls_race.launch_gen = ++tls_race.gen;
        }
        tls_block = &b;
        for (unsigned z = 0; z < gz && b.error.empty(); ++z)
            for (unsigned y = 0; y < gy && b.error.empty(); ++y)
                for (unsigned x = 0; x < gx && b.error.empty(); ++x) {
                    b.block_idx = {x, y, z};
                    std::memset(dyn, 0xff, dyn_smem_bytes + kCanary);
                    run_block(b);
                    if (b.banks) bank_flush16(b);
                    if (!b.error.empty()) {
                        b.error = fmt("%s, block (%u,%u,%u): ", who.c_str(), x, y, z) + b.error;
                        break;
                    }
                    for (std::size_t i = 0; i < kCanary; ++i) {
                        if (dyn[dyn_smem_bytes + i] != 0xff) {
                            b.error = fmt("%s, block (%u,%u,%u): wrote past the end of its %zu "
                                          "bytes of dynamic shared memory (byte %zu)",
                                          who.c_str(), x, y, z, dyn_smem_bytes,
                                          dyn_smem_bytes + i);
                            break;
                        }
                    }
                }
        tls_block = nullptr;
        tls_ids = nullptr;
        if (!b.error.empty()) return report(b.error);
    } catch (const std::exception& e) {
        tls_block = nullptr;
        tls_ids = nullptr;
        return report(who + ": " + e.what());
    }
    return 0;
}

// ---- the compiler's instrumentation calls (-fsanitize=thread), handled here ---------------------
// (hidden: they serve this library's kernel units only)

#define MRT_HOOK extern "C" __attribute__((visibility("hidden")))

#define MRT_TSAN_RW(N)                                                                            \
    MRT_HOOK void __tsan_read##N(void* p) {                                                     \
        mrt_emu::race_hook(p, N, false, __builtin_return_address(0));                             \
    }                                                                                             \
    MRT_HOOK void __tsan_write##N(void* p) {                                                    \
        mrt_emu::race_hook(p, N, true, __builtin_return_address(0));                              \
    }                                                                                             \
    MRT_HOOK void __tsan_unaligned_read##N(void* p) {                                           \
        mrt_emu::race_hook(p, N, false, __builtin_return_address(0));                             \
    }                                                                                             \
    MRT_HOOK void __tsan_unaligned_write##N(void* p) {                                          \
        mrt_emu::race_hook(p, N, true, __builtin_return_address(0));                              \
    }                                                                                             \
    MRT_HOOK void __tsan_volatile_read##N(void* p) {                                            \
        mrt_emu::race_hook(p, N, false, __builtin_return_address(0));                             \
    }                                                                                             \
    MRT_HOOK void __tsan_volatile_write##N(void* p) {                                           \
        mrt_emu::race_hook(p, N, true, __builtin_return_address(0));                              \
    }
MRT_TSAN_RW(1)
MRT_TSAN_RW(2)
MRT_TSAN_RW(4)
MRT_TSAN_RW(8)
MRT_TSAN_RW(16)
MRT_HOOK void __tsan_read_range(void* p, unsigned long n) {
    mrt_emu::race_hook(p, n, false, __builtin_return_address(0));
}
MRT_HOOK void __tsan_write_range(void* p, unsigned long n) {
    mrt_emu::race_hook(p, n, true, __builtin_return_address(0));
}
MRT_HOOK void __tsan_init(void) {}
MRT_HOOK void __tsan_func_entry(void*) {}
MRT_HOOK void __tsan_func_exit(void) {}
MRT_HOOK void __tsan_vptr_update(void**, void*) {}
MRT_HOOK void __tsan_vptr_read(void**) {}
