// Renders an Ollama chat template the way Ollama does: Go's text/template over the request's
// messages. Reads {"template": "...", "messages": [{"role", "content"}, ...]} on stdin and writes
// the rendered prompt on stdout. Used by tests/test_chat_templates.py.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("chat").Parse(input.Template))
	if err := tmpl.Execute(os.Stdout, map[string]any{"Messages": input.Messages}); err != nil {
		panic(err)
	}
}
