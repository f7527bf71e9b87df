// LD_PRELOAD helper for diagnosing crashes of GPU test processes: on SIGSEGV/SIGBUS it
// prints the crashing thread's id and name, the faulting address and a native backtrace to
// stderr, then lets the default action run. On SIGUSR2 (sent by tests/launch.py to a rank that
// hangs) every thread of the process prints its native backtrace, and the process goes on. Python's faulthandler (enabled by some tests) calls
// the previously installed handler, this one, after dumping the Python threads.
//   build: cc -O1 -g -fPIC -shared -o segv_trace.so segv_trace.c
#define _GNU_SOURCE
#include <dirent.h>
#include <execinfo.h>
#include <stdlib.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void on_fault(int sig, siginfo_t* info, void* uc) {
  (void)uc;
  char name[32] = "?";
  pthread_getname_np(pthread_self(), name, sizeof(name));
  char head[256];
  int n = snprintf(head, sizeof(head), "\n[segv_trace] pid %d tid %ld (%s): signal %d at address %p\n",
                   (int)getpid(), (long)syscall(SYS_gettid), name, sig, info ? info->si_addr : NULL);
  if (n > 0) write(2, head, (size_t)n);
  void* frames[64];
  int depth = backtrace(frames, 64);
  backtrace_symbols_fd(frames, depth, 2);
  // Where the shared objects are mapped, to resolve +offsets with addr2line.
  FILE* maps = fopen("/proc/self/maps", "r");
  if (maps) {
    char line[512];
    while (fgets(line, sizeof(line), maps)) {
      if (strstr(line, "r-xp") && (strstr(line, ".so") || strstr(line, "python"))) write(2, line, strlen(line));
    }
    fclose(maps);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

static void print_maps(void) {
  FILE* maps = fopen("/proc/self/maps", "r");
  if (!maps) return;
  char line[512];
  while (fgets(line, sizeof(line), maps)) {
    if (strstr(line, "r-xp") && (strstr(line, ".so") || strstr(line, "python"))) {
      if (write(2, line, strlen(line)) < 0) break;
    }
  }
  fclose(maps);
}

static volatile int print_lock = 0;

static void on_stack_request(int sig, siginfo_t* info, void* uc) {
  (void)uc;
  const pid_t me = getpid();
  const long tid = (long)syscall(SYS_gettid);
  if (info != NULL && info->si_pid != me) {
    // The request from outside: pass it on to every other thread of the process.
    DIR* d = opendir("/proc/self/task");
    if (d != NULL) {
      struct dirent* e;
      while ((e = readdir(d)) != NULL) {
        long t = strtol(e->d_name, NULL, 10);
        if (t > 0 && t != tid) syscall(SYS_tgkill, me, t, sig);
      }
      closedir(d);
    }
    print_maps();
  }
  while (__sync_lock_test_and_set(&print_lock, 1)) {
  }
  char name[32] = "?";
  pthread_getname_np(pthread_self(), name, sizeof(name));
  char head[160];
  int n = snprintf(head, sizeof(head), "\n[segv_trace] pid %d tid %ld (%s): native stack on request\n", (int)me,
                   tid, name);
  if (n > 0 && write(2, head, (size_t)n) < 0) n = 0;
  void* frames[64];
  int depth = backtrace(frames, 64);
  backtrace_symbols_fd(frames, depth, 2);
  __sync_lock_release(&print_lock);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGBUS, &sa, NULL);
  struct sigaction st;
  memset(&st, 0, sizeof(st));
  st.sa_sigaction = on_stack_request;
  st.sa_flags = SA_SIGINFO | SA_RESTART;
  sigaction(SIGUSR2, &st, NULL);
}
