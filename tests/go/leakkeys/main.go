// leakkeys holds N kmalloc-512 objects (add_key "user" payloads of 400 bytes)
// from main.leakKeys, called from a retry loop, and speaks leakgen's protocol:
// READY <pid>, wait for a line, invalidate the keys, RELEASED <pid>, wait for EOF.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"unsafe"
)

// KEY_SPEC_PROCESS_KEYRING is -2; a variable, as a negative constant does not
// convert to uintptr.
var keySpecProcessKeyring = -2

const keyctlInvalidate = 21

// fillPayload is small enough to be inlined: the tests look for its frame.
func fillPayload(p []byte, seed int) {
	for i := range p {
		p[i] = byte(seed + i)
	}
}

//go:noinline
func leakKeys(n int) ([]int, error) {
	typ, err := syscall.BytePtrFromString("user")
	if err != nil {
		return nil, err
	}
	payload := make([]byte, 400)
	fillPayload(payload, n)
	var ids []int
	for i := 0; i < n; i++ {
		desc, err := syscall.BytePtrFromString(fmt.Sprintf("leaktrace-go-%d-%d", os.Getpid(), i))
		if err != nil {
			return ids, err
		}
		id, _, errno := syscall.Syscall6(syscall.SYS_ADD_KEY,
			uintptr(unsafe.Pointer(typ)), uintptr(unsafe.Pointer(desc)),
			uintptr(unsafe.Pointer(&payload[0])), uintptr(len(payload)),
			uintptr(int64(keySpecProcessKeyring)), 0)
		if errno != 0 {
			return ids, errno
		}
		ids = append(ids, int(id))
	}
	return ids, nil
}

//go:noinline
func retryConnect(n int) []int {
	for attempt := 0; ; attempt++ {
		ids, err := leakKeys(n)
		if err == nil {
			return ids
		}
		fmt.Fprintf(os.Stderr, "attempt %d: %v\n", attempt, err)
		if attempt >= 3 {
			os.Exit(1)
		}
	}
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: leakkeys N")
		os.Exit(2)
	}
	n, err := strconv.Atoi(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "N must be a number:", err)
		os.Exit(2)
	}
	ids := retryConnect(n)
	fmt.Printf("READY %d\n", os.Getpid())
	in := bufio.NewReader(os.Stdin)
	in.ReadString('\n')
	for _, id := range ids {
		syscall.Syscall(syscall.SYS_KEYCTL, keyctlInvalidate, uintptr(id), 0)
	}
	fmt.Printf("RELEASED %d\n", os.Getpid())
	in.ReadString('\n')
}
