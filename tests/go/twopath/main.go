// twopath is the kubelet shape in miniature: a retry-loop goroutine
// (main.retryConnect) holds N kmalloc-512 objects (add_key "user" payloads of
// 400 bytes), while another goroutine (main.busyTraffic) makes 50 times as
// many that the kernel frees at once (add_key with an empty description is
// refused after user_preparse allocated the payload). Both leave through the
// same wrapper, syscall.Syscall6, and reach the same kernel call site.
// Protocol as leakgen's: READY <pid>, a line on stdin, invalidate, RELEASED <pid>, EOF.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"
	"unsafe"
)

var keySpecProcessKeyring = -2

const keyctlInvalidate = 21

func addKey(typ, desc *byte, payload []byte) (uintptr, syscall.Errno) {
	id, _, errno := syscall.Syscall6(syscall.SYS_ADD_KEY,
		uintptr(unsafe.Pointer(typ)), uintptr(unsafe.Pointer(desc)),
		uintptr(unsafe.Pointer(&payload[0])), uintptr(len(payload)),
		uintptr(int64(keySpecProcessKeyring)), 0)
	return id, errno
}

//go:noinline
func retryConnect(n int, payload []byte) []int {
	typ, _ := syscall.BytePtrFromString("user")
	var ids []int
	for i := 0; i < n; i++ {
		desc, _ := syscall.BytePtrFromString(fmt.Sprintf("leaktrace-go2-%d-%d", os.Getpid(), i))
		id, errno := addKey(typ, desc, payload)
		if errno != 0 {
			fmt.Fprintln(os.Stderr, "add_key:", errno)
			os.Exit(1)
		}
		ids = append(ids, int(id))
	}
	return ids
}

//go:noinline
func busyTraffic(n int, payload []byte) {
	typ, _ := syscall.BytePtrFromString("user")
	empty, _ := syscall.BytePtrFromString("")
	for i := 0; i < n; i++ {
		if _, errno := addKey(typ, empty, payload); errno != syscall.EINVAL {
			fmt.Fprintln(os.Stderr, "add_key with an empty description: expected EINVAL, got", errno)
			os.Exit(1)
		}
	}
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: twopath N")
		os.Exit(2)
	}
	n, err := strconv.Atoi(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "N must be a number:", err)
		os.Exit(2)
	}
	payload := make([]byte, 400)
	var ids []int
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); busyTraffic(50*n, payload) }()
	go func() { defer wg.Done(); ids = retryConnect(n, payload) }()
	wg.Wait()
	fmt.Printf("READY %d\n", os.Getpid())
	in := bufio.NewReader(os.Stdin)
	in.ReadString('\n')
	for _, id := range ids {
		syscall.Syscall(syscall.SYS_KEYCTL, keyctlInvalidate, uintptr(id), 0)
	}
	fmt.Printf("RELEASED %d\n", os.Getpid())
	in.ReadString('\n')
}
