// Liveness of a local process, shared by the transports' watchdogs. POSIX calls only (no
// iostreams: see the note in error.h), safe to call every few milliseconds from any thread.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace gfcoll {

// False once `pid` is gone: no such process, or a zombie (died, not reaped yet: still signalable).
// pid <= 0 (unknown) and this process count as alive.
inline bool process_alive(long long pid) {
  if (pid <= 0 || pid == static_cast<long long>(getpid())) return true;
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", pid);
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno != ENOENT;
  char buf[512];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return true;
  buf[n] = '\0';
  // "pid (comm) S ...": the state follows the last ')' (comm may itself hold parentheses).
  const char* paren = std::strrchr(buf, ')');
  if (paren == nullptr || paren[1] == '\0' || paren[2] == '\0') return true;
  return paren[2] != 'Z' && paren[2] != 'X';
}

}  // namespace gfcoll
