// NpcForgeServer.cs: starts `npcforge serve` as a child process of the game and reads where it listens.
//
// Input: the executable (the packaged `npcforge`, or a Python with "-m npcforge") and the arguments up to and
// including the dist folder. The server is told `--port 0 --ready-file PATH`: it picks a free port and, once
// listening, writes {"pid", "protocol", "tcp": {"host", "port"}, ..., "characters"} to PATH atomically
// (docs/protocol.md, "Running the server"). Output: Host, Port and Characters, ready for ConnectAsync.
// Dispose() stops the server (a game should do it on quit: the server does not watch its parent).
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Threading.Tasks;

namespace NpcForge
{
    public sealed class NpcForgeServer : IDisposable
    {
        public readonly Process Process;
        public readonly string Host;
        public readonly int Port;
        public readonly List<string> Characters;
        readonly string readyFile;

        NpcForgeServer(Process process, string readyFile, string host, int port, List<string> characters)
        {
            Process = process;
            this.readyFile = readyFile;
            Host = host;
            Port = port;
            Characters = characters;
        }

        /// <summary>Starts `executable arguments --port 0 --ready-file TEMP` and waits until it listens.
        /// Throws TimeoutException, or InvalidOperationException when the server exits first (its stderr,
        /// inherited from the game, says why).</summary>
        public static async Task<NpcForgeServer> StartAsync(string executable, string arguments,
                                                            int timeoutSeconds = 120)
        {
            string readyFile = Path.Combine(Path.GetTempPath(),
                                            "npcforge-ready-" + Guid.NewGuid().ToString("N") + ".json");
            var info = new ProcessStartInfo(executable, arguments + " --port 0 --ready-file \"" + readyFile + "\"")
            {
                UseShellExecute = false,
                CreateNoWindow = true,
            };
            var process = Process.Start(info);
            try
            {
                var deadline = DateTime.UtcNow.AddSeconds(timeoutSeconds);
                // The file appears by rename, so once it exists it is complete.
                while (!File.Exists(readyFile))
                {
                    if (process.HasExited)
                        throw new InvalidOperationException("npcforge serve exited with code " + process.ExitCode +
                                                            " before it was ready");
                    if (DateTime.UtcNow > deadline)
                        throw new TimeoutException("npcforge serve not ready after " + timeoutSeconds + " s");
                    await Task.Delay(50).ConfigureAwait(false);
                }
                var ready = Json.Parse(File.ReadAllText(readyFile)) as Dictionary<string, object>;
                if (ready == null) throw new FormatException(readyFile + ": not a JSON object");
                var tcp = Wire.Obj(ready, "tcp");
                var characters = new List<string>();
                foreach (object id in Wire.Arr(ready, "characters")) characters.Add(id as string);
                return new NpcForgeServer(process, readyFile, Wire.Str(tcp, "host"), (int)Wire.Num(tcp, "port"),
                                          characters);
            }
            catch
            {
                Stop(process, readyFile);
                throw;
            }
        }

        /// <summary>Stops the server; chats still in flight end for their clients as "disconnected".
        /// Process stays readable afterwards (HasExited, ExitCode).</summary>
        public void Dispose() { Stop(Process, readyFile); }

        static void Stop(Process process, string readyFile)
        {
            try
            {
                if (!process.HasExited)
                {
                    process.Kill();
                    process.WaitForExit(10000);
                }
            }
            catch (InvalidOperationException)
            {
                // it exited between the check and the kill
            }
            // A killed server cannot remove its ready file itself.
            File.Delete(readyFile);
        }
    }
}
