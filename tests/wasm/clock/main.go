// clock prints the time, a random number, how long a sleep took and the sorted listing of /in,
// and writes them to /out/result.txt: identical on every worker when the job is deterministic.
package main

import (
	"fmt"
	"math/rand"
	"os"
	"strings"
	"time"
)

func main() {
	var b strings.Builder
	fmt.Fprintln(&b, "time", time.Now().UTC().Format(time.RFC3339Nano))
	fmt.Fprintln(&b, "random", rand.Int63())
	start := time.Now()
	time.Sleep(1500 * time.Millisecond)
	fmt.Fprintln(&b, "slept", time.Since(start).Round(time.Second))
	entries, err := os.ReadDir("/in")
	if err != nil {
		fmt.Fprintln(os.Stderr, "readdir:", err)
		os.Exit(1)
	}
	for _, e := range entries {
		info, _ := e.Info()
		fmt.Fprintln(&b, "entry", e.Name(), info.ModTime().UTC().Format(time.RFC3339))
	}
	fmt.Fprintln(&b, "args", strings.Join(os.Args[1:], ","), "env", os.Getenv("GREETING"))
	fmt.Print(b.String())
	if err := os.WriteFile("/out/result.txt", []byte(b.String()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "write:", err)
		os.Exit(1)
	}
}
