//go:build !linux

package broker

import (
	"os/exec"
	"syscall"
)

// startTied starts cmd in a process group of its own. Without Linux's
// parent-death signal, a node outlives a test process that dies early.
func startTied(cmd *exec.Cmd) (release func(), err error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return func() {}, cmd.Start()
}
