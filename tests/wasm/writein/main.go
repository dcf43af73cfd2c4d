// writein tries to change its read-only input in three ways and reports each attempt.
package main

import (
	"fmt"
	"os"
)

func main() {
	refused := 0
	if err := os.WriteFile("/in/new.txt", []byte("x"), 0o644); err != nil {
		fmt.Println("create refused:", err != nil)
		refused++
	}
	if f, err := os.OpenFile("/in/a", os.O_WRONLY|os.O_TRUNC, 0); err != nil {
		fmt.Println("truncate refused:", err != nil)
		refused++
	} else {
		f.Close()
	}
	if err := os.Remove("/in/a"); err != nil {
		fmt.Println("remove refused:", err != nil)
		refused++
	}
	fmt.Println("refused", refused, "of 3")
	if refused != 3 {
		os.Exit(1)
	}
}
