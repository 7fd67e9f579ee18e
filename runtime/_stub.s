# runtime/_stub.s: the static x86-64 program that is a container's process between the
# runtime's Python and the user's binary (issue 4, the CVE-2019-5736 class).
#
# Why: the created init (pid 1, waiting for `start`) and the child of an `exec` (between its
# fork into the container's pid namespace and its execve) used to be the host's Python. A
# container with CAP_SYS_PTRACE (no user namespace) could open /proc/PID/exe (the host's
# interpreter) and, with CAP_SYS_ADMIN, /proc/PID/map_files/* (libpython, libc) for writing.
# corral now execs this program from a sealed memfd (runtime/_stub.py) for that phase: then
# /proc/PID/exe is the memfd and no host file is mapped in the process at all.
#
# No libc, no relocations, no argv parsing: everything the program needs is in a data block
# that runtime/_stub.py appends right after the code (the `data` label below, reached with
# RIP-relative addressing). The program's own argv and envp are the user's process's, passed
# to execve unchanged.
#
# Build: scripts/build-stub (as + objcopy -O binary -j .text); the bytes are embedded in
# runtime/_stub.py and tests/test_stub.py checks they match this file.
#
# Modes (the data block's first field):
#   1 init: tell the runtime `created` on its socket, wait for its answer, close the socket,
#     block on exec.fifo until `start` writes a byte, load the seccomp filter (when the
#     process has no_new_privs; otherwise Python loaded it before dropping privileges),
#     execve. On failure: "corral: container init: <step>: <strerror>" on fd 2, exit 127.
#   2 exec: fork (the child is born in the container's pid namespace: the process that
#     joined it, in the host's pid namespace, never appears inside); the parent sends the
#     child's pid (a 4-byte datagram) and exits 0; the child does setsid, TIOCSCTTY on fd 0
#     for a terminal, marks the socket close-on-exec (its end of file tells the runtime the
#     exec happened), loads the filter (no_new_privs), execve. On failure: an 8-byte
#     datagram {int32 step, int32 errno} on the socket, exit 127.
# Both modes start with PR_SET_DUMPABLE 0 (exec made the process dumpable again whenever it
# could read the memfd) and name themselves (PR_SET_NAME) for ps.

        .intel_syntax noprefix
        .text
        .globl _start

# The data block's header: little-endian u64 fields (keep in sync with _stub.py: _HEAD).
        .set D_MODE, 0          # 1 init, 2 exec
        .set D_FD_A, 8          # init: exec.fifo; exec: the runtime's socket
        .set D_FD_B, 16         # init: the runtime's socket
        .set D_TTY, 24          # exec: 1 = make fd 0 the controlling terminal
        .set D_SC_FLAGS, 32     # seccomp(2) flags (TSYNC, LOG, SPEC_ALLOW)
        .set D_SC_LEN, 40       # number of BPF instructions; 0 = no filter to load
        .set D_SC_OFF, 48       # offset of the BPF program in the data block
        .set D_PATH, 56         # offset of the executable's path (NUL-terminated)
        .set D_MSG, 64          # init: offset of the `created` message
        .set D_MSG_LEN, 72      # init: its length
        .set D_STEPS, 80        # init: offset of the step table (message prefixes)
        .set D_ERRNOS, 88       # init: offset of the errno table (strerror texts)
        .set D_COMM, 96         # 16 bytes: the name for PR_SET_NAME

        .set MODE_EXEC, 2

# Failing steps (the key of the step table, and of the exec mode's error datagram).
        .set STEP_FORK, 1
        .set STEP_SETSID, 2
        .set STEP_TTY, 3
        .set STEP_CLOEXEC, 4
        .set STEP_SECCOMP, 5
        .set STEP_EXEC, 6
        .set STEP_FIFO, 7
        .set STEP_DUMPABLE, 8

        .set SYS_read, 0
        .set SYS_write, 1
        .set SYS_close, 3
        .set SYS_ioctl, 16
        .set SYS_clone, 56
        .set SYS_execve, 59
        .set SYS_fcntl, 72
        .set SYS_setsid, 112
        .set SYS_prctl, 157
        .set SYS_exit_group, 231
        .set SYS_seccomp, 317

        .set PR_SET_DUMPABLE, 4
        .set PR_SET_NAME, 15
        .set SIGCHLD, 17
        .set TIOCSCTTY, 0x540E
        .set F_SETFD, 2
        .set FD_CLOEXEC, 1
        .set SECCOMP_SET_MODE_FILTER, 1
        .set EINTR, 4

# Registers kept for the whole run (the kernel preserves all but rax, rcx, r11):
#   rbx  the data block
#   r12  the initial stack pointer: [r12] argc, r12+8 argv, then envp after argv's NULL
#   r13  the step that is running (for `fail`)
_start:
        lea     rbx, [rip + data]
        mov     r12, rsp
        sub     rsp, 64                 # scratch: read buffers, datagrams, sock_fprog
        mov     r13d, STEP_DUMPABLE
        mov     eax, SYS_prctl          # prctl(PR_SET_DUMPABLE, 0): first of all
        mov     edi, PR_SET_DUMPABLE
        xor     esi, esi
        xor     edx, edx
        xor     r10d, r10d
        xor     r8d, r8d
        syscall
        test    rax, rax
        js      fail
        mov     eax, SYS_prctl          # prctl(PR_SET_NAME, comm): for ps; may fail
        mov     edi, PR_SET_NAME
        lea     rsi, [rbx + D_COMM]
        syscall
        cmp     qword ptr [rbx + D_MODE], MODE_EXEC
        je      exec_mode

# --- init mode ------------------------------------------------------------------------------
init_mode:
        mov     eax, SYS_write          # the `created` message, one datagram
        mov     rdi, [rbx + D_FD_B]
        mov     rsi, [rbx + D_MSG]
        add     rsi, rbx
        mov     rdx, [rbx + D_MSG_LEN]
        syscall
        test    rax, rax
        js      exit1                   # the runtime is gone: nobody to report to
1:      xor     eax, eax                # SYS_read: its answer (state.json is written)
        mov     rdi, [rbx + D_FD_B]
        mov     rsi, rsp
        mov     edx, 64
        syscall
        cmp     rax, -EINTR
        je      1b
        test    rax, rax
        jle     exit1                   # end of file: the runtime gave up on us
        mov     eax, SYS_close
        mov     rdi, [rbx + D_FD_B]
        syscall
        mov     r13d, STEP_FIFO
2:      xor     eax, eax                # SYS_read: block until `start` writes a byte
        mov     rdi, [rbx + D_FD_A]
        mov     rsi, rsp
        mov     edx, 1
        syscall
        cmp     rax, 1
        je      3f
        test    rax, rax                # end of file: no `start` can ever come (the fifo
        je      exit1                   # is open O_RDWR, so this is not exec.fifo)
        cmp     rax, -EINTR
        je      2b
        jmp     fail
3:      mov     eax, SYS_close
        mov     rdi, [rbx + D_FD_A]
        syscall
        jmp     load_and_exec

# --- exec mode ------------------------------------------------------------------------------
exec_mode:
        mov     r13d, STEP_FORK
        mov     eax, SYS_clone          # clone(SIGCHLD, 0, 0, 0, 0): fork
        mov     edi, SIGCHLD
        xor     esi, esi
        xor     edx, edx
        xor     r10d, r10d
        xor     r8d, r8d
        syscall
        test    rax, rax
        js      fail
        jz      child
        mov     [rsp], eax              # parent: the child's pid, as the host sees it
        mov     eax, SYS_write
        mov     rdi, [rbx + D_FD_A]
        mov     rsi, rsp
        mov     edx, 4
        syscall
        xor     edi, edi
        test    rax, rax
        jns     exit_edi
        mov     edi, 1
        jmp     exit_edi

child:
        mov     r13d, STEP_SETSID
        mov     eax, SYS_setsid         # the child leads the session: if the exiting
        syscall                         # parent did, the terminal would hang up
        test    rax, rax
        js      fail
        cmp     qword ptr [rbx + D_TTY], 0
        je      1f
        mov     r13d, STEP_TTY
        mov     eax, SYS_ioctl          # ioctl(0, TIOCSCTTY, 0)
        xor     edi, edi
        mov     esi, TIOCSCTTY
        xor     edx, edx
        syscall
        test    rax, rax
        js      fail
1:      mov     r13d, STEP_CLOEXEC
        mov     eax, SYS_fcntl          # fcntl(sock, F_SETFD, FD_CLOEXEC)
        mov     rdi, [rbx + D_FD_A]
        mov     esi, F_SETFD
        mov     edx, FD_CLOEXEC
        syscall
        test    rax, rax
        js      fail

# --- both: the filter, then the user's binary ------------------------------------------------
load_and_exec:
        mov     rax, [rbx + D_SC_LEN]
        test    rax, rax
        jz      1f
        mov     r13d, STEP_SECCOMP
        mov     [rsp], ax               # struct sock_fprog { u16 len; filter * }
        mov     rdx, [rbx + D_SC_OFF]
        add     rdx, rbx
        mov     [rsp + 8], rdx
        mov     eax, SYS_seccomp
        mov     edi, SECCOMP_SET_MODE_FILTER
        mov     rsi, [rbx + D_SC_FLAGS]
        mov     rdx, rsp
        syscall
        test    rax, rax
        js      fail
1:      mov     r13d, STEP_EXEC
        mov     rdi, [rbx + D_PATH]
        add     rdi, rbx
        lea     rsi, [r12 + 8]          # argv
        mov     rax, [r12]
        lea     rdx, [r12 + rax * 8 + 16]  # envp: after argv's NULL
        mov     eax, SYS_execve
        syscall
        # fall through: execve returned, rax = -errno

# --- failure: r13 = step, rax = -errno -------------------------------------------------------
fail:
        neg     eax
        mov     r14d, eax
        cmp     qword ptr [rbx + D_MODE], MODE_EXEC
        jne     1f
        mov     [rsp], r13d             # exec mode: {step, errno} to the runtime
        mov     [rsp + 4], r14d
        mov     eax, SYS_write
        mov     rdi, [rbx + D_FD_A]
        mov     rsi, rsp
        mov     edx, 8
        syscall
        jmp     exit127
1:      mov     rdi, [rbx + D_STEPS]    # init mode: "<prefix naming the step><strerror>\n"
        add     rdi, rbx
        mov     esi, r13d
        call    lookup
        mov     eax, SYS_write
        mov     edi, 2
        syscall
        mov     rdi, [rbx + D_ERRNOS]
        add     rdi, rbx
        mov     esi, r14d
        call    lookup
        mov     eax, SYS_write
        mov     edi, 2
        syscall
exit127:
        mov     edi, 127
        jmp     exit_edi
exit1:
        mov     edi, 1
exit_edi:
        mov     eax, SYS_exit_group
        syscall

# lookup: rdi = a table of {u8 key, u8 length, text}, ended by key 0 (whose text is the
# fallback); esi = the key. Returns rsi = the text, rdx = its length.
lookup:
        movzx   eax, byte ptr [rdi]
        movzx   edx, byte ptr [rdi + 1]
        test    eax, eax
        jz      1f
        cmp     eax, esi
        je      1f
        lea     rdi, [rdi + rdx + 2]
        jmp     lookup
1:      lea     rsi, [rdi + 2]
        ret

        .balign 8
data:   # _stub.py appends the data block here
