// LD_PRELOAD helper for diagnosing crashes of GPU test processes: on SIGSEGV/SIGBUS/SIGABRT it
// prints the crashing thread's id and name, the faulting address and a native backtrace to
// stderr, then lets the default action run. Python's faulthandler (enabled by some tests) calls
// the previously installed handler, this one, after dumping the Python threads.
//   build: cc -O1 -g -fPIC -shared -o segv_trace.so segv_trace.c
#define _GNU_SOURCE
#include <execinfo.h>
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

__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGBUS, &sa, NULL);
}
