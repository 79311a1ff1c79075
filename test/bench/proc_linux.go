package main

import "syscall"

// sysProcAttr makes the kernel kill a child when the bench dies.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
