// dialloop: a client that keeps retrying an unreachable server, as kubelet
// retried its API server in leaktrace's founding incident. It dials a closed
// port on 127.0.0.1 (the TCP slab cache: one socket per attempt, freed when
// the refused connect is closed) once a second, N times, then prints DONE.
package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

//go:noinline
func dialAPIServer(addr string) error {
	conn, err := net.Dial("tcp", addr)
	if err == nil {
		conn.Close()
	}
	return err
}

//go:noinline
func retryLoop(addr string, n int) int {
	refused := 0
	for i := 0; i < n; i++ {
		if dialAPIServer(addr) != nil {
			refused++
		}
		time.Sleep(time.Second)
	}
	return refused
}

func main() {
	n := 10
	if len(os.Args) > 1 {
		v, err := strconv.Atoi(os.Args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "usage: dialloop [N] [ADDR]")
			os.Exit(2)
		}
		n = v
	}
	addr := "127.0.0.1:1"
	if len(os.Args) > 2 {
		addr = os.Args[2]
	}
	fmt.Printf("READY %d\n", os.Getpid())
	refused := retryLoop(addr, n)
	fmt.Printf("DONE %d refused=%d\n", os.Getpid(), refused)
}
