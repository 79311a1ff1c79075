package broker

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

// The kernel sends a child its parent-death signal when the thread that
// started it ends, not the process. So nodes tied to this process are
// started from one goroutine locked to its thread, which lives as long as
// any of them does, and ends (with its thread) after the last one exited.
var spawner struct {
	sync.Mutex
	reqs chan spawnReq
	live int
}

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

// startTied starts cmd in a process group of its own, killed by the kernel
// when this process dies. release must be called once cmd has exited.
func startTied(cmd *exec.Cmd) (release func(), err error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	spawner.Lock()
	if spawner.reqs == nil {
		spawner.reqs = make(chan spawnReq)
		go spawnLoop(spawner.reqs)
	}
	spawner.live++
	reqs := spawner.reqs
	spawner.Unlock()

	req := spawnReq{cmd: cmd, done: make(chan error, 1)}
	reqs <- req
	if err := <-req.done; err != nil {
		releaseSpawner()
		return nil, err
	}
	return releaseSpawner, nil
}

func releaseSpawner() {
	spawner.Lock()
	defer spawner.Unlock()
	spawner.live--
	if spawner.live == 0 {
		close(spawner.reqs)
		spawner.reqs = nil
	}
}

func spawnLoop(reqs <-chan spawnReq) {
	runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
	for req := range reqs {
		req.done <- req.cmd.Start()
	}
}
